"""Installs plugin-launcher's LMCache drop-in at interpreter start (``plugin-launcher-lmcache``).

Put on PYTHONPATH by ``plugin-launcher-lmcache`` or ``$(plugin-launcher-lmcache --pythonpath)``.
Only an import hook is registered here; LMCache and the launcher are imported when LMCache itself
imports its launcher module.  Any ``sitecustomize`` that this one shadows still runs.
"""

import os
import sys


def _install() -> None:
    try:
        from plugin_launcher import lmcache_hook

        lmcache_hook.install()
    except Exception as exc:  # never stop the host from starting
        print(f"plugin-launcher: LMCache drop-in not installed: {type(exc).__name__}: {exc}",
              file=sys.stderr)


def _chain() -> None:
    """Run the next ``sitecustomize`` on the path, the one this file hides."""
    here = os.path.dirname(os.path.abspath(__file__))
    saved_path = list(sys.path)
    this = sys.modules.pop("sitecustomize", None)
    try:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
        import importlib

        try:
            importlib.import_module("sitecustomize")
        except ModuleNotFoundError as exc:
            if exc.name != "sitecustomize":
                raise
    finally:
        sys.path[:] = saved_path
        if this is not None:
            sys.modules["sitecustomize"] = this


_install()
_chain()
