"""Readiness, watchdog and once-per-host scope, carried out for one ``Supervisor`` on its thread.

The supervisor calls a few hooks (``environment``, ``may_spawn``, ``started``, ``ended``,
``view``, ``close``); everything else happens here, through the supervisor's selector and timer
heap: the sd_notify socket (notify.py) is one more reader, a watchdog is one timer per run that
is re-armed lazily (a pet only moves a deadline), and a ``standby`` plugin retries its host lock
(scope.py) every ``scope.RETRY`` seconds without changing state until it gets it, so standing by
costs one ``flock`` call per retry and nothing else.  The policy itself (``ready``,
``watchdog_missed``, ``standby``) is the state machine's (machine.py).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .machine import State
from .notify import (
    ENV_SOCKET,
    ENV_WATCHDOG,
    NotifySocket,
    owner_of,
    parse_notice,
    plugin_variables,
)
from .output import safe_logger
from .scope import RETRY, HostLock, ScopeError, open_lock
from .timers import Timer

if TYPE_CHECKING:
    from .plan import Decision
    from .process import PluginProcess, Run
    from .supervisor import Supervisor

log = safe_logger("plugin_launcher.supervisor")  # names and paths escaped
INHERITED = (ENV_SOCKET, ENV_WATCHDOG, "WATCHDOG_PID")  # never pass on our own service manager's


class Liveness:
    """sd_notify, watchdogs and host locks of one supervisor (its thread only)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.sup = supervisor
        self.socket: NotifySocket | None = None
        try:
            self.socket = NotifySocket()
        except OSError as exc:
            log.warning("cannot create the sd_notify socket (%s); plugins get no NOTIFY_SOCKET, "
                        "and ready: notify plugins will not become ready", exc)
        else:
            supervisor.add_reader(self.socket.fileno(), self._on_datagrams)
        role, worker_id = supervisor.log_fields
        self.owner = f"pid={os.getpid()} role={role.lower() or '-'} worker={worker_id}"
        self.locks: dict[tuple[str, str | None], HostLock] = {}
        self._watchdogs: dict[str, Timer] = {}
        self._standby: dict[str, Timer] = {}

    # ----------------------------------------------------------------------------- hooks
    def environment(self, decision: Decision, env: dict[str, str]) -> dict[str, str]:
        """The plugin's environment with our NOTIFY_SOCKET (and WATCHDOG_USEC), never the
        launcher's own service manager's (a plugin must not speak for the launcher)."""
        for key in INHERITED:
            env.pop(key, None)
        if self.socket is not None:
            env.update(plugin_variables(self.socket.path, decision.options.watchdog))
        return env

    def may_spawn(self, proc: PluginProcess) -> bool:
        """True if ``proc`` may start a run here; a ``scope: host`` plugin whose lock another
        launcher holds goes to ``standby`` instead (and retries), a lock that cannot be used
        makes it fail with one line."""
        options = proc.decision.options
        if options.scope != "host" or proc.decision.command is None:
            return True
        key = (proc.name, options.scope_key)
        lock = self.locks.get(key)
        try:
            if lock is None:
                lock = self.locks[key] = open_lock(proc.name, options.scope_key, self.owner)
            if lock.try_acquire():
                return True
        except ScopeError as exc:
            error = proc.error = f"scope: host: {exc}"
            self.sup._feed(proc, lambda: proc.machine.cannot_run(error))
            return False
        holder = lock.holder()
        log.info("plugin %s on standby: another launcher of this host runs it (%s)", proc.name,
                 holder or "holder unknown")
        self.sup._feed(proc, proc.machine.standby)
        self._retry_later(proc, lock)
        return False

    def started(self, proc: PluginProcess, run: Run) -> None:
        """A run has started: nothing said yet; its watchdog and ready timeout start now."""
        options = proc.decision.options
        now = self.sup.clock()
        ready_timeout = options.ready_timeout if options.ready == "notify" else None
        proc.readiness.begin(now, options.watchdog, ready_timeout)
        if options.watchdog is not None:
            self._arm_watchdog(proc, run, options.watchdog)

    def ended(self, proc: PluginProcess) -> None:
        """A run is over: nothing is enforced any more.  A plugin removed from the locations
        gives its host lock up (another launcher may still run its own copy)."""
        proc.readiness.end()
        timer = self._watchdogs.pop(proc.name, None)
        if timer is not None:
            timer.cancel()
        if proc.change == "removed":
            lock = self.locks.pop((proc.name, proc.decision.options.scope_key), None)
            if lock is not None:
                lock.release()

    def view(self, proc: PluginProcess) -> dict[str, Any]:
        """Extra status fields: who holds the host lock, for a plugin on standby."""
        if proc.state != State.STANDBY:
            return {}
        lock = self.locks.get((proc.name, proc.decision.options.scope_key))
        return {"holder": lock.holder() if lock is not None else None}

    def close(self) -> None:
        """The supervisor is done (plugins stopped): give up every host lock, close the socket."""
        for timer in [*self._watchdogs.values(), *self._standby.values()]:
            timer.cancel()
        self.release_locks()
        if self.socket is not None:
            self.socket.close()

    def release_locks(self) -> None:
        """Let other launchers of the host take over (our plugins are gone)."""
        for lock in list(self.locks.values()):
            lock.release()
        self.locks.clear()

    # ---------------------------------------------------------------------------- standby
    def _retry_later(self, proc: PluginProcess, lock: HostLock) -> None:
        old = self._standby.pop(proc.name, None)
        if old is not None:
            old.cancel()
        self._standby[proc.name] = self.sup._after(RETRY, lambda: self._retry(proc, lock))

    def _retry(self, proc: PluginProcess, lock: HostLock) -> None:
        self._standby.pop(proc.name, None)
        if self.sup.procs.get(proc.name) is not proc or proc.state != State.STANDBY:
            return  # stopped, removed or replaced meanwhile
        try:
            acquired = lock.try_acquire()
        except ScopeError as exc:
            log.error("plugin %s: %s", proc.name, exc)
            acquired = False
        if not acquired:
            self._retry_later(proc, lock)
            return
        log.info("plugin %s: taking over on this host (the launcher that ran it is gone)",
                 proc.name)
        self.sup._feed(proc, proc.machine.start)

    # ---------------------------------------------------------------------------- watchdog
    def _arm_watchdog(self, proc: PluginProcess, run: Run, delay: float) -> None:
        self._watchdogs[proc.name] = self.sup._after(delay,
                                                     lambda: self._check_watchdog(proc, run))

    def _check_watchdog(self, proc: PluginProcess, run: Run) -> None:
        """The first deadline of a watchdog period: a pet since then moved the deadline (arm
        again for it), else the run missed its watchdog."""
        self._watchdogs.pop(proc.name, None)
        if proc.run is not run or proc.state not in (State.STARTING, State.RUNNING):
            return
        deadline = proc.readiness.watchdog_deadline
        if deadline is None:
            return  # STOPPING=1: ending by itself
        left = deadline - self.sup.clock()
        if left > 0:
            self._arm_watchdog(proc, run, left)
            return
        period = proc.readiness.watchdog or 0.0
        self.sup._feed(proc, lambda: proc.machine.watchdog_missed(
            f"missed its watchdog: no WATCHDOG=1 for {period:g}s"))

    # ------------------------------------------------------------------------- the socket
    def _on_datagrams(self) -> None:
        assert self.socket is not None
        datagrams = self.socket.receive()
        if not datagrams:
            return
        leaders = {p.run.pid: p for p in self.sup.procs.values()
                   if p.run is not None and p.run.returncode is None}
        for datagram in datagrams:
            proc = owner_of(datagram.pid, leaders)
            if proc is None:
                log.debug("sd_notify: dropped a message from pid %d (no plugin of this launcher)",
                          datagram.pid)
                continue
            self._apply(proc, datagram.data)

    def _apply(self, proc: PluginProcess, data: bytes) -> None:
        notice = parse_notice(data)
        if notice.ignored:
            log.debug("plugin %s sd_notify: ignored %s", proc.name, ", ".join(notice.ignored))
        now = self.sup.clock()
        readiness = proc.readiness
        change = readiness.apply(notice, now)
        if notice.status is not None or change.became_ready:
            self.sup._status_dirty = True
            self.sup._changed = True
        if change.extended and readiness.ready_deadline is not None:
            deadline = readiness.ready_deadline
            self.sup._feed(proc, lambda: proc.machine.extend_ready(deadline - now))
        if change.became_ready:
            if proc.decision.options.ready == "notify":
                self.sup._feed(proc, proc.machine.ready)
        if change.stopping:
            log.info("plugin %s says it is stopping (STOPPING=1)", proc.name)
        if change.trigger:
            self.sup._feed(proc, lambda: proc.machine.watchdog_missed(
                "asked for its watchdog (WATCHDOG=trigger)"))
