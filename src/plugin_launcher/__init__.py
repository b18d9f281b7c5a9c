"""plugin-launcher: run plugins as supervised, orphan-free side processes next to a server.

Names are imported lazily (PEP 562) so that ``import plugin_launcher.plugin``, the plugin
authors' kit, stays as cheap as the standard library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import ConfigError, LauncherConfig, load_config
    from .identity import Identity, IdentityError, detect_worker_identity
    from .launcher import PluginLauncher
    from .process import State

_EXPORTS = {
    "ConfigError": "config",
    "LauncherConfig": "config",
    "load_config": "config",
    "Identity": "identity",
    "IdentityError": "identity",
    "detect_worker_identity": "identity",
    "PluginLauncher": "launcher",
    "State": "process",
}
__all__ = [
    "ConfigError",
    "Identity",
    "IdentityError",
    "LauncherConfig",
    "PluginLauncher",
    "State",
    "detect_worker_identity",
    "load_config",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'plugin_launcher' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
