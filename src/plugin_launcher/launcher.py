"""``PluginLauncher``: the public facade (plan, supervise, stop); a drop-in for LMCache's."""

from __future__ import annotations

import atexit
import logging
import os
import time
import weakref
from typing import Any

from .config import LauncherConfig, coerce_config
from .identity import detect_worker_identity
from .output import LoggingSink, Sink
from .plan import Decision, Plan, make_plan
from .process import ACTIVE_STATES, PluginProcess, State, plugin_environment
from .supervisor import Supervisor

log = logging.getLogger("plugin_launcher.launcher")
SETTLE_TIME = 0.5
STOP_MARGIN = 30.0  # past SIGKILL only a process stuck in the kernel (D state) can remain


def check_role(role: Any) -> str:
    if not isinstance(role, str) or not role.strip():
        raise ValueError(f"role must be a non-empty string, got {role!r}")
    if "_" in role or any(c.isspace() for c in role) or "/" in role:
        raise ValueError(f"role must not contain '_', '/' or spaces, got {role!r}")
    return role.upper()


def check_worker_id(worker_id: Any) -> int | None:
    if worker_id is None or worker_id == -1 and not isinstance(worker_id, bool):
        return None
    if isinstance(worker_id, bool) or not isinstance(worker_id, int) or worker_id < 0:
        raise ValueError(f"worker_id must be an integer >= 0 (or None / -1 for none), "
                         f"got {worker_id!r}")
    return worker_id


def check_worker_count(worker_count: Any) -> int:
    if isinstance(worker_count, bool) or not isinstance(worker_count, int) or worker_count < 1:
        raise ValueError(f"worker_count must be an integer >= 1, got {worker_count!r}")
    return worker_count


def file_signature(path: str) -> tuple[Any, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _stop_at_exit(ref: weakref.ref[PluginLauncher]) -> None:
    launcher = ref()
    if launcher is not None and launcher._owner_pid == os.getpid():
        launcher.stop_plugins()


class PluginLauncher:
    """Runs the plugins selected for one process (role, worker) and stops them with it."""

    def __init__(
        self,
        config: Any,
        role: str,
        worker_id: int | None = 0,
        worker_count: int | None = 1,
        *,
        detect: bool = False,
        sink: Sink | None = None,
        settle_time: float = SETTLE_TIME,
    ) -> None:
        self.config: LauncherConfig = coerce_config(config)
        self.role = check_role(role)
        if detect and (worker_id is None or worker_count is None):
            identity = detect_worker_identity()
            if worker_id is None:
                worker_id = identity.worker_id
            if worker_count is None:
                if identity.worker_count is None:
                    raise ValueError(f"{identity.source} gives no worker count: pass worker_count")
                worker_count = identity.worker_count
        self.worker_id = check_worker_id(worker_id)
        self.worker_count = check_worker_count(worker_count)
        self.sink: Sink = sink if sink is not None else LoggingSink()
        self.settle_time = settle_time
        self._supervisor: Supervisor | None = None
        self._owner_pid: int | None = None
        self._config_json = self.config.to_json()
        self._watcher: Any = None
        self._reload_pending = False
        self._reload_due = 0.0
        self._stopping = False
        self._listeners: list[Any] = []
        self._last_plugins: list[PluginProcess] = []

    # ------------------------------------------------------------------------------ planning
    def plan(self) -> Plan:
        return make_plan(self.config, self.role, self.worker_id)

    def _environment(self, decision: Decision) -> dict[str, str]:
        return plugin_environment(dict(os.environ), self.role, self.worker_id, self.worker_count,
                                  self._config_json, decision.name)

    def _report(self, plan: Plan) -> list[Decision]:
        for warning in plan.warnings:
            log.warning("%s", warning)
        for decision in plan.decisions:
            for warning in decision.warnings:
                log.warning("%s", warning)
            if not decision.selected and decision.reason.startswith("refused"):
                log.error("plugin %s %s", decision.name, decision.reason)
        return plan.selected

    # ------------------------------------------------------------------------------ lifetime
    def _ensure_supervisor(self) -> Supervisor:
        if self._supervisor is None or not self._supervisor.alive:
            self._stopping = False
            self._reload_pending = False
            self._supervisor = Supervisor(self.sink, self._environment)
            self._supervisor.listeners.extend(self._listeners)
            self._supervisor.start()
            if self._owner_pid is None:
                atexit.register(_stop_at_exit, weakref.ref(self))
            self._owner_pid = os.getpid()
        return self._supervisor

    def launch_plugins(self) -> list[PluginProcess]:
        """Start every selected plugin and return at once (their output is pumped in the back)."""
        supervisor = self._ensure_supervisor()
        if self.config.watch_plugins:
            self.watch()  # before planning, so a file added meanwhile is not missed
        selected = self._report(self.plan())

        def launch() -> None:
            supervisor.launch(selected)
            for decision in selected:
                supervisor.procs[decision.name].signature = file_signature(decision.path)

        supervisor.call(launch)
        if not selected:
            log.info("no plugin selected for role %s, worker %s", self.role, self.worker_id)
        return self.plugins

    @property
    def plugins(self) -> list[PluginProcess]:
        """The plugins of the current (or, after a stop, the last) launch."""
        if self._supervisor is None:
            return list(self._last_plugins)
        return list(self._supervisor.procs.values())

    def status(self) -> list[dict[str, Any]]:
        if self._supervisor is None or not self._supervisor.alive:
            return [p.status() for p in self.plugins]
        return self._supervisor.call(self._supervisor.status)

    def add_listener(self, listener: Any) -> None:
        """Call ``listener()`` (on the supervisor thread) after any plugin changes state."""
        self._listeners.append(listener)
        if self._supervisor is not None:
            self._supervisor.listeners.append(listener)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no plugin runs or waits to restart; False on timeout."""
        supervisor = self._supervisor
        if supervisor is None or not supervisor.alive:
            return True
        return supervisor.wait_until(supervisor.settled, timeout)

    @property
    def settled(self) -> bool:
        supervisor = self._supervisor
        return supervisor is None or not supervisor.alive or supervisor.call(supervisor.settled)

    def stop_plugins(self, timeout: float | None = None) -> None:
        """SIGTERM every plugin group at once, SIGKILL after ``timeout`` (default: each plugin's
        ``stop_timeout``), and return once every plugin process is gone.  Idempotent."""
        supervisor = self._supervisor
        if supervisor is None:
            return
        if supervisor.alive:

            def stop_all() -> None:
                self._stopping = True  # a pending live reload must not start anything now
                supervisor.stop(None, timeout)

            supervisor.call(stop_all)
            grace = timeout if timeout is not None else max(
                (p.decision.options.stop_timeout for p in supervisor.procs.values()), default=0.0)
            if not supervisor.wait_until(supervisor.quiet, grace + STOP_MARGIN):
                log.error("plugins still running %.0fs after SIGKILL: %s", STOP_MARGIN, ", ".join(
                    p.name for p in supervisor.procs.values() if p.state in ACTIVE_STATES))
                supervisor.kill_all()  # from this thread, in case the loop itself is stuck
        supervisor.close()
        self._close_watcher()
        self._last_plugins = list(supervisor.procs.values())
        self._supervisor = None

    def guard_group(self, pgid: int, stop_timeout: float) -> None:
        """Have the guardian also end process group ``pgid`` if this process dies (wrap mode)."""
        guardian = self._ensure_supervisor().guardian
        guardian.watch(pgid, stop_timeout)
        guardian.flush()

    def __enter__(self) -> PluginLauncher:
        self.launch_plugins()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_plugins()

    # --------------------------------------------------------------------------- live reload
    def reload(self) -> dict[str, list[str]]:
        """Make the running set equal to what the locations select now (see README)."""
        supervisor = self._ensure_supervisor()
        plan = self.plan()
        return supervisor.call(lambda: self._apply(supervisor, plan))

    def _apply(self, supervisor: Supervisor, plan: Plan) -> dict[str, list[str]]:
        if self._stopping:
            return {"started": [], "stopped": [], "restarted": [], "deferred": []}
        wanted = {d.name: d for d in self._report(plan)}
        now = time.time()
        changes: dict[str, list[str]] = {"started": [], "stopped": [], "restarted": [],
                                         "deferred": []}
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
            self._schedule_reload(supervisor)
        return changes

    def watch(self) -> None:
        """Follow the plugin locations with inotify and reload after each settled change."""
        from .watch import Inotify

        supervisor = self._ensure_supervisor()
        if self._watcher is not None:
            return
        watcher = Inotify()
        watcher.watch_tree(self.config.plugin_locations)
        self._watcher = watcher

        def on_event() -> None:
            if watcher.drain():
                self._schedule_reload(supervisor)

        supervisor.call(lambda: supervisor.add_reader(watcher.fd, on_event))

    def _schedule_reload(self, supervisor: Supervisor) -> None:
        """Debounce: reload once no event has come for ``settle_time`` (runs on the loop)."""
        self._reload_due = supervisor.clock() + self.settle_time
        if self._reload_pending:
            return
        self._reload_pending = True

        def fire() -> None:
            if self._stopping or self._supervisor is not supervisor:
                return
            remaining = self._reload_due - supervisor.clock()
            if remaining > 0:
                supervisor.after(remaining, fire)
                return
            self._reload_pending = False
            if self._watcher is not None:
                self._watcher.watch_tree(self.config.plugin_locations)
            self._apply(supervisor, self.plan())

        supervisor.after(self.settle_time, fire)

    def _close_watcher(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None


__all__ = ["PluginLauncher", "State"]
