"""Per-plugin resource limits, applied in the child between fork and exec.

``setrlimit`` and ``setpriority`` bind the plugin and everything it starts, need no privileges
and exist on every Linux.  cgroup v2 groups would add a true memory ceiling for the whole tree but
need a delegated, writable hierarchy; ``mechanism()`` reports what this machine offers.
"""

from __future__ import annotations

import os
import resource
import signal
from collections.abc import Callable

from .options import PluginOptions

# Output a plugin prints when a limit stopped it (checked only for the limits it has).
LIMIT_MESSAGES = {
    b"MemoryError": "memory_max",
    b"Cannot allocate memory": "memory_max",
    b"std::bad_alloc": "memory_max",
    b"out of memory": "memory_max",
    b"Too many open files": "open_files_max",
}


def preexec_for(options: PluginOptions) -> Callable[[], None] | None:
    """A function for Popen(preexec_fn=...) that applies the limits, or None when there are none.

    None keeps the fast vfork/posix_spawn path of subprocess for plugins without limits.
    """
    if not options.has_limits:
        return None
    pairs = []
    if options.memory_max is not None:
        pairs.append((resource.RLIMIT_AS, options.memory_max))
    if options.open_files_max is not None:
        pairs.append((resource.RLIMIT_NOFILE, options.open_files_max))
    if options.cpu_time_max is not None:
        pairs.append((resource.RLIMIT_CPU, options.cpu_time_max))
    nice = options.nice

    def apply() -> None:
        for limit, value in pairs:
            _soft, hard = resource.getrlimit(limit)
            if hard != resource.RLIM_INFINITY and value > hard:
                value = hard
            # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL one second later at the hard one.
            hard_value = value + 1 if limit == resource.RLIMIT_CPU else value
            if hard != resource.RLIM_INFINITY:
                hard_value = min(hard_value, hard)
            resource.setrlimit(limit, (value, hard_value))
        if nice is not None:
            os.setpriority(os.PRIO_PROCESS, 0, nice)

    return apply


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


def mechanism() -> str:
    """Which limit mechanism applies on this machine (shown by ``list``)."""
    cgroup2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    note = "cgroup v2 present but not used" if cgroup2 else "no cgroup v2 hierarchy"
    return f"setrlimit (RLIMIT_AS, RLIMIT_NOFILE, RLIMIT_CPU) and nice in the child; {note}"
