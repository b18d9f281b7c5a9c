"""Import stubs for modules LMCache imports but this test machine lacks (requests, torch).

Only the roots named to :func:`install` are stubbed; everything else imports for real.  A stub
module hands out stub classes for any attribute, so ``import torch`` and ``torch.Tensor`` work at
import time; nothing of LMCache that the tests run calls into them.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Iterable, Sequence
from typing import Any


class _StubMeta(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _stub(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]  # used as a decorator
        return _stub(f"{cls.__qualname__}()")

    def __getitem__(cls, item: Any) -> Any:
        return cls

    def __or__(cls, other: Any) -> Any:
        return cls

    def __ror__(cls, other: Any) -> Any:
        return cls

    def __bool__(cls) -> bool:
        return False


def _stub(qualname: str) -> Any:
    return _StubMeta(qualname.rsplit(".", 1)[-1], (), {"__qualname__": qualname,
                                                       "__module__": "stub"})


class _StubModule(types.ModuleType):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__path__: list[str] = []
        self.__file__ = f"<stub {name}>"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        value = _stub(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _StubModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


class StubFinder(importlib.abc.MetaPathFinder):
    def __init__(self, roots: Iterable[str]) -> None:
        self.roots = set(roots)

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, _Loader(), is_package=True)
        return None


def install(roots: Iterable[str]) -> None:
    """Stub these top-level modules unless they are really installed."""
    import importlib.util

    missing = [r for r in roots if r not in sys.modules and importlib.util.find_spec(r) is None]
    sys.meta_path.insert(0, StubFinder(missing))
