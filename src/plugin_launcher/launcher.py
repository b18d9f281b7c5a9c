"""``PluginLauncher``: the public facade (plan, supervise, stop); a drop-in for LMCache's."""

from __future__ import annotations

import atexit
import os
import signal
import time
import weakref
from typing import Any

from .config import LauncherConfig, coerce_config
from .environment import ConfigHandoff, identity_variables, plugin_environment
from .identity import AUTO, DEFAULT_WORKER_COUNT, DEFAULT_WORKER_ID, resolve_identity
from .logs import RingBuffer
from .output import LoggingSink, Sink, safe_logger
from .plan import Decision, Plan, make_plan
from .process import ACTIVE_STATES, PluginProcess, State
from .reload import Reloader, file_signature
from .supervisor import OperationError, Supervisor, SupervisorStuck

log = safe_logger("plugin_launcher.launcher")  # names and paths escaped
SETTLE_TIME = 0.5
STOP_MARGIN = 30.0  # past SIGKILL only a process stuck in the kernel (D state) can remain
STUCK_AFTER = 2.0  # stop_plugins: a loop that does not answer within this long is stuck
STOP_STEP = 1.0  # stop_plugins: how often it checks that the loop still answers
DEFAULT_OUTPUT_BATCH = 0.02  # seconds; see README "Performance" (host tax)
MAX_OUTPUT_BATCH = 1.0


def check_output_batch(value: Any) -> float:
    """``output_batch`` in seconds: 0 (read at once) to 1 s."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0.0 <= float(value) <= MAX_OUTPUT_BATCH):
        raise ValueError(f"output_batch must be between 0 and {MAX_OUTPUT_BATCH:g} seconds, "
                         f"got {value!r}")
    return float(value)


def check_role(role: Any) -> str | None:
    """Upper-case role; None means "no role" (LMCache's MP server): no file-name filtering."""
    if role is None:
        return None
    if not isinstance(role, str) or not role.strip():
        raise ValueError(f"role must be a non-empty string or None, got {role!r}")
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


class UnknownPluginError(KeyError):
    """No plugin of that name in this launcher; the message offers the nearest name."""

    def __init__(self, name: str, known: list[str]) -> None:
        from .advice import did_you_mean

        near = did_you_mean(name, known, cutoff=0.6)
        hint = f" (did you mean {near!r}?)" if near is not None else ""
        self.message = f"no plugin named {name!r}{hint}"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


def parse_signal(value: Any) -> int:
    """A signal number from ``15``, ``"15"``, ``"TERM"``, ``"SIGTERM"`` or ``signal.SIGTERM``."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    elif isinstance(value, str):
        upper = value.strip().upper()
        upper = upper if upper.startswith("SIG") else "SIG" + upper
        member = signal.Signals.__members__.get(upper)
        if member is None:
            raise ValueError(f"unknown signal {value!r} (use a name such as TERM or HUP, "
                             "or a number)")
        number = int(member)
    else:
        raise ValueError(f"expected a signal name or number, got {value!r}")
    if not 1 <= number < signal.NSIG:
        raise ValueError(f"signal number must be between 1 and {signal.NSIG - 1}, got {number}")
    return number


def _stop_at_exit(ref: weakref.ref[PluginLauncher]) -> None:
    launcher = ref()
    if launcher is not None and launcher._owner_pid == os.getpid():
        launcher.stop_plugins()


class PluginLauncher:
    """Runs the plugins selected for one process (role, worker) and stops them with it."""

    def __init__(
        self,
        config: Any,
        role: str | None,
        *,
        worker_id: int | str | None = DEFAULT_WORKER_ID,
        worker_count: int | str | None = DEFAULT_WORKER_COUNT,
        detect: bool = False,
        sink: Sink | None = None,
        settle_time: float = SETTLE_TIME,
        output_batch: float = DEFAULT_OUTPUT_BATCH,
    ) -> None:
        self.config: LauncherConfig = coerce_config(config)
        self.role = check_role(role)
        if detect:  # None (or "auto") means: read it from torchrun/Slurm/MPI/PMI/Kubernetes
            worker_id, worker_count = resolve_identity(
                AUTO if worker_id is None else worker_id,
                AUTO if worker_count is None else worker_count)
        self.worker_id = check_worker_id(worker_id)
        self.worker_count = check_worker_count(worker_count)
        self.sink: Sink = sink if sink is not None else LoggingSink()
        self.settle_time = settle_time
        self.output_batch = check_output_batch(output_batch)
        self._supervisor: Supervisor | None = None
        self._owner_pid: int | None = None
        self._handoff = ConfigHandoff(self.config.to_json())
        self._reloader = Reloader(lambda: self._report(self.plan()),
                                  lambda: self.config.plugin_locations, settle_time)
        self._listeners: list[Any] = []
        self._last_plugins: list[PluginProcess] = []
        self._last_rings: dict[str, RingBuffer] = {}

    # ------------------------------------------------------------------------------ planning
    def plan(self) -> Plan:
        return make_plan(self.config, self.role, self.worker_id)

    def identity_environment(self) -> dict[str, str]:
        """The LMCache variables every plugin of this launcher gets (upper-case role, -1 for no
        worker); the LMCache face overrides this with what each LMCache release passed."""
        worker_id = -1 if self.worker_id is None else self.worker_id
        return identity_variables(self.role or "", str(worker_id), str(self.worker_count),
                                  self._handoff.inline)

    def _environment(self, decision: Decision) -> dict[str, str]:
        identity = {**self.identity_environment(), **self._handoff.variables()}
        return plugin_environment(os.environ, identity, decision.name)

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
            self._supervisor = Supervisor(self.sink, self._environment,
                                          log_fields=(self.role or "", self.worker_id),
                                          output_batch=self.output_batch)
            self._supervisor.listeners.extend(self._listeners)
            self._reloader.reset(self._supervisor)
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
            supervisor.publish_status()  # /status shows them as soon as this returns

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

    def status_snapshot(self) -> list[dict[str, Any]]:
        """``status()`` as the supervisor last published it (at most 0.2 s old), without waiting
        for its thread: what the status server serves, so a busy loop cannot stall a scrape."""
        supervisor = self._supervisor
        if supervisor is None or not supervisor.alive:
            return [p.status() for p in self.plugins]
        return list(supervisor.snapshot)

    # ------------------------------------------------------------------ one plugin, on demand
    def _resolve(self, name: str) -> tuple[Supervisor, PluginProcess]:
        """The running supervisor and plugin ``name``; UnknownPluginError with a near miss."""
        supervisor = self._supervisor
        if supervisor is None or not supervisor.alive:
            raise OperationError("the launcher is not running (call launch_plugins first)")
        proc = supervisor.procs.get(name)
        if proc is None:
            raise UnknownPluginError(name, list(supervisor.procs))
        return supervisor, proc

    def start_plugin(self, name: str) -> dict[str, Any]:
        """Start plugin ``name`` if it is not running (also ends an operator stop); returns its
        status once it has started (or failed to)."""
        supervisor, _ = self._resolve(name)
        supervisor.call(lambda: supervisor.operator_start(name))
        supervisor.wait_until(lambda: supervisor.procs[name].state not in (
            State.STOPPING, State.STARTING), STOP_MARGIN)
        return self._status_of(supervisor, name)

    def stop_plugin(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        """Stop plugin ``name`` (TERM its group, KILL after ``timeout``, default its
        ``stop_timeout``) and keep it stopped — across ``reload()`` too — until
        ``start_plugin``.  Returns its status once its processes are gone."""
        supervisor, proc = self._resolve(name)
        supervisor.call(lambda: supervisor.operator_stop(name, timeout))
        grace = proc.decision.options.stop_timeout if timeout is None else timeout
        supervisor.wait_until(lambda: supervisor.procs[name].state not in ACTIVE_STATES,
                              grace + STOP_MARGIN)
        return self._status_of(supervisor, name)

    def restart_plugin(self, name: str) -> dict[str, Any]:
        """Stop plugin ``name`` (as ``stop_plugin``) and start it again; counts in ``restarts``.
        Returns its status once the new run has started (or failed to)."""
        supervisor, proc = self._resolve(name)
        old_run = proc.run

        def moved_on() -> bool:
            now = supervisor.procs[name]
            if now.state in (State.STOPPING, State.STARTING):
                return False
            return now.run is not old_run or now.state not in ACTIVE_STATES

        supervisor.call(lambda: supervisor.operator_restart(name))
        supervisor.wait_until(moved_on, proc.decision.options.stop_timeout + STOP_MARGIN)
        return self._status_of(supervisor, name)

    def signal_plugin(self, name: str, sig: int | str) -> int:
        """Send ``sig`` (number, ``"HUP"`` or ``"SIGHUP"``) to plugin ``name``'s main process;
        returns its PID.  OperationError if it is not running."""
        number = parse_signal(sig)
        supervisor, _ = self._resolve(name)
        return supervisor.call(lambda: supervisor.operator_signal(name, number))

    def tail(self, name: str, n: int = 10) -> list[str]:
        """The last ``n`` lines of plugin ``name`` (stdout and stderr in arrival order; at most
        the newest 1,000 lines or 256 KiB), decoded with invalid UTF-8 replaced."""
        supervisor = self._supervisor
        if supervisor is None or not supervisor.alive:
            ring = self._last_rings.get(name)
            if ring is None:
                raise UnknownPluginError(name, list(self._last_rings))
            lines = ring.last(n)
        else:
            self._resolve(name)
            lines = supervisor.call(lambda: supervisor.tail(name, n))
        return [line.decode("utf-8", "replace") for line in lines]

    def follow(self, name: str, tap: Any) -> Any:
        """Call ``tap(stream, block)`` on the supervisor thread for each new block of output of
        plugin ``name`` (it must not block); returns a function that ends it."""
        supervisor, _ = self._resolve(name)
        supervisor.call(lambda: supervisor.add_tap(name, tap))

        def cancel() -> None:
            if supervisor.alive:
                try:
                    supervisor.call(lambda: supervisor.remove_tap(name, tap))
                except RuntimeError:
                    pass  # the loop ended meanwhile: its taps went with it

        return cancel

    @staticmethod
    def _status_of(supervisor: Supervisor, name: str) -> dict[str, Any]:
        return supervisor.call(lambda: supervisor.procs[name].status())

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

    def begin_stop(self, timeout: float | None = None) -> None:
        """Start stopping every plugin (as ``stop_plugins``) and return at once; follow it with
        ``stopped``, ``awaited()`` and ``kill_remaining()``, then ``stop_plugins()`` to finish."""
        supervisor = self._supervisor
        if supervisor is None or not supervisor.alive:
            return
        supervisor.call(lambda: self._begin_stop_on_loop(supervisor, timeout))

    @property
    def stopped(self) -> bool:
        """True once no plugin is active and no plugin process group is still being ended."""
        supervisor = self._supervisor
        return supervisor is None or not supervisor.alive or supervisor.call(supervisor.quiet)

    def awaited(self) -> list[tuple[str, int, float | None]]:
        """While stopping: (name, pid, seconds until SIGKILL, None once sent) per plugin left."""
        supervisor = self._supervisor
        if supervisor is None or not supervisor.alive:
            return []
        return supervisor.call(supervisor.awaited)

    def kill_remaining(self) -> None:
        """SIGKILL every plugin process group still being ended (an impatient operator)."""
        supervisor = self._supervisor
        if supervisor is not None and supervisor.alive:
            try:
                supervisor.call(supervisor.kill_all, STUCK_AFTER)
            except SupervisorStuck:
                supervisor.kill_all()  # from this thread: the loop does not answer

    def stop_plugins(self, timeout: float | None = None, *, margin: float = STOP_MARGIN) -> None:
        """SIGTERM every plugin group at once, SIGKILL after ``timeout`` (default: each plugin's
        ``stop_timeout``), and return once every plugin process is gone.  Idempotent.

        ``margin``: how long to wait past SIGKILL (only a process stuck in the kernel needs it).
        If the supervisor thread stops answering (a sink or log handler that blocks forever),
        the groups are ended from this thread instead, so this returns within the grace plus
        about 5 s (``STUCK_AFTER + STOP_STEP`` to notice, 1 s past SIGKILL, 1 s for the
        guardian; README: Lifetime) whatever the loop does."""
        supervisor = self._supervisor
        if supervisor is None:
            return
        stuck = False
        if supervisor.alive:
            started = time.monotonic()
            try:
                supervisor.call(lambda: self._begin_stop_on_loop(supervisor, timeout),
                                STUCK_AFTER)
            except SupervisorStuck:
                stuck = True
            grace = timeout if timeout is not None else max(
                (p.decision.options.stop_timeout for p in list(supervisor.procs.values())),
                default=0.0)
            deadline = started + grace + margin
            while not stuck:
                left = deadline - time.monotonic()
                if supervisor.wait_until(supervisor.quiet, max(0.0, min(STOP_STEP, left))):
                    break
                if time.monotonic() >= deadline:
                    log.error("plugins still running %.0fs after SIGKILL: %s", margin, ", ".join(
                        p.name for p in supervisor.procs.values() if p.state in ACTIVE_STATES))
                    supervisor.kill_all()  # from this thread, in case the loop itself is stuck
                    break
                stuck = supervisor.alive and not supervisor.responsive(STUCK_AFTER)
            if stuck:
                self._end_groups_here(supervisor, started + grace)
        supervisor.close(0.1 if stuck else None)
        self._reloader.close()
        self._handoff.close()
        self._last_plugins = list(supervisor.procs.values())
        self._last_rings = supervisor.rings
        self._supervisor = None

    def _begin_stop_on_loop(self, supervisor: Supervisor, timeout: float | None) -> None:
        self._reloader.stopping = True  # a pending live reload must not start anything now
        supervisor.stop(None, timeout)

    @staticmethod
    def _end_groups_here(supervisor: Supervisor, kill_at: float) -> None:
        """The loop is stuck: TERM every known group from this thread, KILL what is left at
        ``kill_at`` (the grace stop_plugins promised), wait until they are gone (at most 1 s
        past the KILL: only zombies could remain), and tell the guardian."""
        from .guardian import end_groups

        groups = supervisor.known_groups()
        log.error("the plugin supervisor thread does not answer (a sink or log handler is "
                  "blocking it); ending %d plugin process groups from this thread", len(groups))
        left = max(0.0, kill_at - time.monotonic())
        end_groups({pgid: left for pgid in groups})
        for pgid in groups:
            supervisor.guardian.forget(pgid)

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
        return supervisor.call(lambda: self._reloader.apply(lambda: self._report(plan)))

    def watch(self) -> None:
        """Follow the plugin locations with inotify and reload after each settled change."""
        self._reloader.watch(self._ensure_supervisor())


__all__ = ["OperationError", "PluginLauncher", "State", "UnknownPluginError", "parse_signal"]
