"""Swapping LMCache's launcher class for ours, in modules already imported and in those to come.

Kept free of the rest of the package: the no-code route imports this module at the start of every
Python process (through ``sitecustomize``), so it must cost next to nothing until an LMCache
launcher module is actually imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

RUNTIME_MODULE = "lmcache.v1.plugin.runtime_plugin_launcher"
LEGACY_MODULE = "lmcache.v1.plugin.plugin_launcher"
TARGET_MODULES = (RUNTIME_MODULE, LEGACY_MODULE)
BOOTSTRAP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bootstrap")

Replacements = Mapping[str, tuple[str, type]]
_lock = threading.RLock()
_patched: list[tuple[ModuleType, str, Any]] = []  # (module, attribute, LMCache's original)
_originals: dict[type, Any] = {}  # our class -> LMCache's class it replaced
_finder: _PatchingFinder | None = None


def _lmcache_modules() -> list[ModuleType]:
    return [m for n, m in list(sys.modules.items())
            if m is not None and (n == "lmcache" or n.startswith("lmcache."))]


def _patch_module(module: ModuleType, replacements: Replacements) -> None:
    """In the defining module, then in every ``lmcache.*`` module holding LMCache's class."""
    name, ours = replacements[module.__name__]
    original = module.__dict__.get(name)
    if original is None or original is ours:
        return
    _originals[ours] = original
    for holder in _lmcache_modules():
        for attr, value in list(vars(holder).items()):
            if value is original:
                setattr(holder, attr, ours)
                _patched.append((holder, attr, original))


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, after: Callable[[ModuleType], None]):
        self.loader = loader
        self.after = after

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.after(module)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of LMCache's launcher modules."""

    def __init__(self, replacements: Callable[[], Replacements]) -> None:
        self.replacements = replacements
        self._busy = threading.local()

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in TARGET_MODULES or getattr(self._busy, "on", False):
            return None
        self._busy.on = True
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy.on = False
        if spec.loader is None:
            return spec

        def after(module: ModuleType) -> None:
            with _lock:
                _patch_module(module, self.replacements())

        spec.loader = _PatchingLoader(spec.loader, after)
        return spec


def install(replacements: Replacements | None = None) -> None:
    """Patch what is imported, and hook what is not yet.  With no ``replacements`` the drop-in
    module is imported only when an LMCache launcher module loads (the sitecustomize route)."""
    global _finder

    def get() -> Replacements:
        if replacements is not None:
            return replacements
        from .lmcache import REPLACEMENTS

        return REPLACEMENTS

    with _lock:
        for name in TARGET_MODULES:
            module = sys.modules.get(name)
            if module is not None:
                _patch_module(module, get())
        if _finder is None:
            _finder = _PatchingFinder(get)
            sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    global _finder
    with _lock:
        if _finder is not None:
            try:
                sys.meta_path.remove(_finder)
            except ValueError:
                pass
            _finder = None
        while _patched:
            module, attr, original = _patched.pop()
            setattr(module, attr, original)
        # modules imported after install() took our class by name: give them LMCache's back
        for holder in _lmcache_modules():
            for attr, value in list(vars(holder).items()):
                if isinstance(value, type) and value in _originals:
                    setattr(holder, attr, _originals[value])
        _originals.clear()


def installed() -> bool:
    return _finder is not None


def bootstrap_pythonpath(current: str) -> str:
    """PYTHONPATH with our ``sitecustomize`` folder first (once)."""
    parts = [p for p in current.split(os.pathsep) if p and p != BOOTSTRAP_DIR]
    return os.pathsep.join([BOOTSTRAP_DIR, *parts])
