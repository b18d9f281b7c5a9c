"""plugin-launcher: run plugins as supervised, orphan-free side processes next to a server."""

from .config import ConfigError, LauncherConfig, load_config
from .identity import Identity, IdentityError, detect_worker_identity
from .launcher import PluginLauncher
from .process import State

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
