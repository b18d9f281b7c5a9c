"""Live reload: make the running set equal to what the plugin locations select now.

``Reloader.apply`` diffs the selected plugins against the supervisor's (added, changed, removed;
a file younger than ``settle_time`` is deferred, so a half-written file never starts);
``schedule`` debounces (one reload once no change has come for ``settle_time``); ``watch``
follows the locations with inotify.  Everything but ``watch``/``close`` runs on the supervisor
thread; ``PluginLauncher.reload()`` and ``watch()`` are thin wrappers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from .output import safe_logger
from .plan import Decision
from .process import ACTIVE_STATES
from .supervisor import Supervisor

log = safe_logger("plugin_launcher.launcher")  # names and paths escaped
Changes = dict[str, list[str]]


def no_changes() -> Changes:
    return {"started": [], "stopped": [], "restarted": [], "deferred": []}


def file_signature(path: str) -> tuple[Any, ...] | None:
    """What tells a changed file from an unchanged one (device, inode, size, mtime)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Reloader:
    """Live reload for one launcher; ``reset`` binds it to each new supervisor."""

    def __init__(self, selected: Callable[[], list[Decision]],
                 locations: Callable[[], list[str]], settle_time: float) -> None:
        self.selected = selected  # plans and reports (warnings, refusals): the plugins to run
        self.locations = locations
        self.settle_time = settle_time
        self.supervisor: Supervisor | None = None
        self.stopping = False  # set on the loop when a stop begins: nothing may start now
        self._pending = False
        self._due = 0.0
        self._watcher: Any = None

    def reset(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.stopping = False
        self._pending = False

    def apply(self, selected: Callable[[], list[Decision]] | None = None) -> Changes:
        """Start added plugins, restart changed ones, stop removed ones (on the loop).
        ``selected``: the plugins to run (default: plan now)."""
        supervisor = self.supervisor
        if self.stopping or supervisor is None:
            return no_changes()
        wanted = {d.name: d for d in (selected or self.selected)()}
        now = time.time()
        changes = no_changes()
        for name, decision in wanted.items():
            signature = file_signature(decision.path)
            proc = supervisor.procs.get(name)
            unchanged = (proc is not None and proc.change != "removed"
                         and proc.signature == signature
                         and proc.decision.command == decision.command)
            if unchanged:
                continue
            if signature is not None and now - signature[3] / 1e9 < self.settle_time:
                changes["deferred"].append(name)  # still being written: look again later
                continue
            if proc is None or proc.change == "removed":
                log.info("started new plugin %s", name)
                supervisor.launch([decision], change="added")
                changes["started"].append(name)
            else:
                if proc.state in ACTIVE_STATES:
                    log.info("restarting changed plugin %s", name)
                else:
                    log.info("starting changed plugin %s", name)
                supervisor.replace(decision)
                changes["restarted"].append(name)
            supervisor.procs[name].signature = signature
        for name, proc in supervisor.procs.items():
            if name not in wanted and proc.change != "removed":
                if proc.state in ACTIVE_STATES:
                    log.info("stopping removed plugin %s", name)
                supervisor.stop([name])
                proc.change = "removed"
                changes["stopped"].append(name)
        if changes["deferred"]:
            self.schedule()
        return changes

    def schedule(self) -> None:
        """Debounce: reload once no event has come for ``settle_time`` (on the loop)."""
        supervisor = self.supervisor
        if supervisor is None:
            return
        self._due = supervisor.clock() + self.settle_time
        if self._pending:
            return
        self._pending = True

        def fire() -> None:
            if self.stopping or self.supervisor is not supervisor:
                return
            remaining = self._due - supervisor.clock()
            if remaining > 0:
                supervisor.after(remaining, fire)
                return
            self._pending = False
            if self._watcher is not None:
                self._watcher.watch_tree(self.locations())
            self.apply()

        supervisor.after(self.settle_time, fire)

    def watch(self, supervisor: Supervisor) -> None:
        """Follow the plugin locations with inotify and reload after each settled change."""
        from .watch import Inotify

        if self._watcher is not None:
            return
        watcher = Inotify()
        watcher.watch_tree(self.locations())
        self._watcher = watcher

        def on_event() -> None:
            if watcher.drain():
                self.schedule()

        supervisor.call(lambda: supervisor.add_reader(watcher.fd, on_event))

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
