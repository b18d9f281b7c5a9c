"""Per-plugin resource limits: rlimits and nice, plus a cgroup memory limit where writable.

``setrlimit`` and ``setpriority`` bind the plugin and everything it starts, need no privileges
and exist on every Linux.  The rlimits are applied by the exec'd prologue of containment.py
(``ulimit``), the niceness by the host while that prologue waits at its gate (process.spawn);
never in a ``preexec_fn``.  ``memory_max`` is also a memory-controller limit
where the launcher may write cgroups; ``mechanism()`` reports what this machine offers.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
from typing import TYPE_CHECKING

from .options import PluginOptions

if TYPE_CHECKING:
    from .containment import Containment

log = logging.getLogger("plugin_launcher.limits")
OPEN_FILES_CAP = 1 << 20  # the kernel's default nr_open: a hard limit of "unlimited" means this
_plugins_open_files: list[int] = []  # the soft RLIMIT_NOFILE plugins keep once ours was raised


def raise_open_files() -> bool:
    """This process ran out of descriptors (EMFILE; each plugin holds three here): double its
    soft RLIMIT_NOFILE within the hard limit, as a supervisor must (a stock soft limit of 1024
    stops at about 330 plugins).  Plugins keep the soft limit they would have had (the prologue
    sets it back, see ``plugins_open_files``): a program using ``select()`` must never see a
    descriptor above 1023.  False if there is no room left."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = OPEN_FILES_CAP if hard == resource.RLIM_INFINITY else hard
    new = min(cap, max(soft * 2, 1024))
    if new <= soft:
        return False
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ValueError, OSError):
        return False
    if not _plugins_open_files:
        _plugins_open_files.append(soft)
    log.info("out of file descriptors: raised this process's open files limit from %d to %d "
             "(each plugin holds 3 here; plugins keep a soft limit of %d)", soft, new,
             _plugins_open_files[0])
    return True


def plugins_open_files() -> int | None:
    """The soft RLIMIT_NOFILE a plugin without ``open_files_max`` gets, if ours was raised."""
    return _plugins_open_files[0] if _plugins_open_files else None

# Output a plugin prints when a limit stopped it (checked only for the limits it has).
LIMIT_MESSAGES = {
    b"MemoryError": "memory_max",
    b"Cannot allocate memory": "memory_max",
    b"std::bad_alloc": "memory_max",
    b"out of memory": "memory_max",
    b"Too many open files": "open_files_max",
}


def limit_for_signal(options: PluginOptions, signum: int) -> str | None:
    """The limit that explains a death by ``signum``, if the plugin had it."""
    if options.cpu_time_max is not None and signum in (signal.SIGXCPU, signal.SIGKILL):
        return f"cpu_time_max={options.cpu_time_max}s"
    return None


def describe(options: PluginOptions) -> str:
    parts = []
    if options.nice is not None:
        parts.append(f"nice={options.nice}")
    if options.memory_max is not None:
        parts.append(f"memory_max={options.memory_max}")
    if options.open_files_max is not None:
        parts.append(f"open_files_max={options.open_files_max}")
    if options.cpu_time_max is not None:
        parts.append(f"cpu_time_max={options.cpu_time_max}s")
    return ", ".join(parts)


def mechanism(containment: Containment | None = None) -> str:
    """Which limit mechanism applies on this machine (shown by ``list``)."""
    memory = ""
    if containment is not None and containment.memory_root is not None:
        memory = ("; memory_max is also a cgroup memory limit "
                  f"({os.path.dirname(containment.memory_root)})")
    elif containment is not None:
        memory = "; no writable cgroup memory controller: memory_max is RLIMIT_AS only"
    return ("setrlimit (RLIMIT_AS, RLIMIT_NOFILE, RLIMIT_CPU) by an exec'd prologue in the "
            "child, nice by the host before the plugin's first instruction (no preexec_fn, no "
            f"fork of the host){memory}")
