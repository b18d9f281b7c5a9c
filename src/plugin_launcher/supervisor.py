"""One thread, one selector: every plugin's pipes, exits, timers and commands in a single loop.

Waiting is event-driven: output and exits wake the selector (a pidfd per plugin), commands from
other threads arrive through a self-pipe, and timers (backoff, timeouts, stop grace) set the
select timeout.  Nothing polls while nothing is due; the only timed waits are while a process
group is being ended (checked every 50 ms) or on kernels without pidfd.
"""

from __future__ import annotations

import errno
import functools
import inspect
import os
import random
import resource
import selectors
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from . import cgroups, limits
from .containment import Containment
from .guardian import GroupEnder, live_groups, signal_groups
from .guardian_client import GuardianClient
from .liveness import Liveness
from .logs import LAST_LINES, RingBuffer, RotatingLog, log_path
from .machine import (
    RUN_STATES,
    Action,
    Arm,
    Cancel,
    Log,
    PluginMachine,
    Renew,
    Spawn,
    Terminate,
    TimerKind,
    TransitionError,
)
from .output import Sink, safe_logger
from .plan import Decision
from .process import ACTIVE_STATES, PluginProcess, Run, State, spawn
from .timers import Timer, TimerHeap

log = safe_logger("plugin_launcher.supervisor")  # names and paths escaped
T = TypeVar("T")
READ_SIZE = 1 << 16
FLOOD_READS = 8  # reads of one pipe in a row while each is a flood's (see _on_output)
# A read this large is a flood: a writer blocked on a full pipe can leave less than READ_SIZE
# in it (a pipe is 16 page slots, the last one part-filled), so "a full read" would miss it.
FLOOD_CHUNK = READ_SIZE // 2
GROUP_CHECK = 0.05
POLL_WITHOUT_PIDFD = 0.1
MAX_SELECT_TIMEOUT = 3600.0  # epoll refuses ~24.8 days; a later timer is simply waited in steps
LOOP_ERROR_DELAY = (0.01, 1.0)  # a failing loop round waits this long, doubling, before retrying
STATUS_INTERVAL = 0.2  # the published status snapshot is refreshed at most this often
CALL_TIMEOUT = 10.0  # a healthy loop answers a command within one round (milliseconds)
_OUTPUTS = ("outputs",)  # selector data of the nested selector holding every plugin pipe
_WRITABLE = ("writable",)  # selector data of a sink or guardian pipe awaited for writability


def group_alive(pgid: int) -> bool:
    return bool(live_groups([pgid]))


class OperationError(RuntimeError):
    """An operator request that cannot be done now (e.g. signalling a plugin that is not
    running); the message is one line for the operator."""


class SupervisorStuck(RuntimeError):
    """The supervisor thread did not answer in time (a sink or log handler blocks it)."""


class _ThreeArgumentSink:
    """Adapts a sink written before ``write`` took ``pid`` (it simply never sees the PID)."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink

    def write(self, name: str, stream: str, block: bytes, pid: int | None = None) -> None:
        self.sink.write(name, stream, block)


def adapt_sink(sink: Any) -> Sink:
    """``sink`` itself if its ``write`` accepts a PID, else a wrapper that drops it."""
    try:
        inspect.signature(sink.write).bind("name", "stdout", b"", 0)
    except TypeError:
        return _ThreeArgumentSink(sink)
    except ValueError:  # no signature to inspect (a builtin): trust the protocol
        pass
    return sink  # type: ignore[no-any-return]


def _error_key(exc: BaseException) -> tuple[str, str, int]:
    """Where an error came from: the same key again means the same error repeating."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return (type(exc).__name__, "", 0)
    return (type(exc).__name__, tb.tb_frame.f_code.co_filename, tb.tb_lineno)


class Supervisor:
    """Owns every ``PluginProcess``; all of their state changes happen on its thread."""

    def __init__(
        self,
        sink: Sink,
        environment: Callable[[Decision], dict[str, str]],
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        log_fields: tuple[str, int | None] = ("", None),
        output_batch: float = 0.0,
    ) -> None:
        self.sink = adapt_sink(sink)
        # A sink with flow control (StreamSink, JsonSink) never blocks: it buffers, and the loop
        # stops reading plugin pipes while it is full (see _flow_control).
        self._flow: Any = sink if all(
            hasattr(sink, a) for a in ("fileno", "pending", "full", "flush")) else None
        self._flow_fd: int | None = None  # registered for EVENT_WRITE while lines are pending
        self._guardian_fd: int | None = None  # likewise for the guardian's pipe
        self.output_batch = output_batch  # seconds to let output gather after each read
        self.log_fields = log_fields  # role and worker ID, for log_file templates
        self.rings: dict[str, RingBuffer] = {}  # name -> its last lines (survive restarts)
        self.taps: dict[str, list[Callable[[str, bytes], None]]] = {}  # name -> followers
        self._plugin_logs: dict[str, RotatingLog | None] = {}  # name -> its log_file
        self._log_files: dict[str, RotatingLog] = {}  # path -> writer (shared by path)
        self.environment = environment
        self.clock = clock
        self.rng = rng or random.Random()
        self.procs: dict[str, PluginProcess] = {}
        self.listeners: list[Callable[[], None]] = []
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        # Every plugin pipe sits in a nested selector, itself one entry of the main one: pausing
        # all plugin reading (a full sink, or the output batch interval) is one unregister.
        self._outputs = selectors.DefaultSelector()
        self._outputs_on = False
        self._batch_hold = False  # output was just read: let more gather (output_batch)
        self._read_full = False  # a read this round filled its buffer (a flood: no batch pause)
        self._read_data = False  # a read this round returned data (not only end-of-file)
        self._sink_hold = False  # the sink is full: leave the lines in the pipes
        self._set_outputs(True)
        self._commands: deque[Callable[[], None]] = deque()
        self._timers = TimerHeap()
        self._waiters: list[tuple[Callable[[], bool], threading.Event]] = []
        self._ending = GroupEnder()  # process groups being ended (TERM, grace, KILL)
        self._replacements: dict[str, Decision] = {}  # name -> its changed file's decision
        self._bad_transitions: set[tuple[str, str]] = set()  # logged once each
        self._group_timer = False
        self._poll_timer = False
        self._changed = False
        self._closing = False
        self.snapshot: list[dict[str, Any]] = []  # status as last published: read lock-free
        self._status_dirty = False
        self._published_at = float("-inf")
        self._publish_timer = False
        self.guardian = GuardianClient()
        self.containment: Containment | None = None  # chosen at start (containment.py)
        self._guardian_started = 0.0
        self.liveness = Liveness(self)  # sd_notify socket, watchdogs, host locks
        self._thread = threading.Thread(target=self._loop, name="plugin-supervisor", daemon=True)

    # ----------------------------------------------------------------- other threads' interface
    def start(self) -> None:
        self.containment = Containment.detect()
        self.guardian.cgroup_roots = list(self.containment.roots)
        self.guardian.start()
        self._watch_guardian()
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def call(self, fn: Callable[[], T], timeout: float | None = CALL_TIMEOUT) -> T:
        """Run ``fn`` on the supervisor thread and return its result.  ``SupervisorStuck`` if
        the thread has not run it within ``timeout`` seconds (it may still run it later)."""
        if threading.current_thread() is self._thread or not self._thread.is_alive():
            return fn()
        deadline = None if timeout is None else time.monotonic() + timeout
        done = threading.Event()
        box: dict[str, Any] = {}

        def command() -> None:
            try:
                box["result"] = fn()
            except BaseException as exc:  # handed back to the caller
                box["error"] = exc
            finally:
                done.set()

        self._commands.append(command)
        self.wake()
        while not done.wait(1.0 if deadline is None else min(1.0, deadline - time.monotonic())):
            if not self._thread.is_alive():
                raise RuntimeError("plugin supervisor thread has died")
            if deadline is not None and time.monotonic() >= deadline:
                raise SupervisorStuck(f"the plugin supervisor thread did not answer within "
                                      f"{timeout:g}s (a sink or log handler may be blocking it)")
        if "error" in box:
            raise box["error"]
        return box["result"]  # type: ignore[no-any-return]

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass  # already awake

    def wait_until(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait until ``predicate()`` holds on the loop; False after ``timeout`` seconds, or if
        the loop thread did not answer within that time (or ``CALL_TIMEOUT`` without one)."""
        event = threading.Event()
        entry = (predicate, event)
        deadline = None if timeout is None else time.monotonic() + timeout

        def register() -> None:
            if predicate():
                event.set()
            else:
                self._waiters.append(entry)

        def unregister() -> None:
            if entry in self._waiters:
                self._waiters.remove(entry)

        try:
            self.call(register, CALL_TIMEOUT if timeout is None else min(timeout, CALL_TIMEOUT))
        except SupervisorStuck:
            return False
        while not event.wait(1.0 if deadline is None else
                             max(0.0, min(1.0, deadline - time.monotonic()))):
            if not self._thread.is_alive():
                return False
            if deadline is not None and time.monotonic() >= deadline:
                self._commands.append(unregister)  # no predicate left behind on the loop
                self.wake()
                return False
        return True

    def responsive(self, timeout: float) -> bool:
        """True if the loop thread runs a command within ``timeout`` seconds."""
        try:
            self.call(lambda: None, timeout)
        except SupervisorStuck:
            return False
        return True

    def known_groups(self) -> dict[int, float]:
        """Every process group this supervisor may still have to end -> its stop timeout.
        Safe from another thread while the loop is stuck (copies are retried if it moves)."""
        for _ in range(10):
            try:
                groups = {pgid: 0.0 for pgid in list(self._ending.deadlines)}
                for proc in list(self.procs.values()):
                    run = proc.run
                    if run is not None and proc.state in ACTIVE_STATES:
                        groups[run.pgid] = proc.decision.options.stop_timeout
                return groups
            except RuntimeError:  # changed size during iteration: the loop is alive after all
                continue
        return {}

    def close(self, timeout: float | None = None) -> None:
        """End the loop thread (plugins must already be stopped) and release the guardian.
        ``timeout``: how long a loop that does not answer is waited for; it is then left
        behind (a daemon thread) with its descriptors, rather than blocking the caller."""
        if self._thread.is_alive():
            try:
                self.call(self._request_close, timeout)
            except SupervisorStuck:
                pass
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.guardian.close()
                self._release_containment()
                self.liveness.release_locks()  # its plugins were ended from the caller's thread
                return  # still in use by the stuck thread: closing them could hit a reused fd
        self.guardian.close()
        self._release_containment()
        self.liveness.close()
        self._outputs.close()
        self._selector.close()
        for writer in self._log_files.values():
            writer.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the loop whenever ``fd`` is readable (supervisor thread only)."""
        self._selector.register(fd, selectors.EVENT_READ, (lambda *_: callback(), None, None))

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        """Call ``fn`` on the loop after ``delay`` seconds (supervisor thread only)."""
        self._after(delay, fn)

    # ------------------------------------------------------- the guardian, itself supervised
    def _watch_guardian(self) -> None:
        """Notice the guardian's death at once (its pidfd on the loop)."""
        self._guardian_started = self.clock()
        fd = self.guardian.pidfd
        if fd is not None:
            self.add_reader(fd, self._guardian_died)

    def _guardian_died(self) -> None:
        fd = self.guardian.pidfd
        if fd is not None:
            self._selector.unregister(fd)
        # its pipe is about to be closed: no longer awaited for writability
        self._guardian_fd = self._watch_writable(self._guardian_fd, None, False)
        soon = self._guardian_started + 1.0 - self.clock()
        if soon > 0:  # one that dies at once is not restarted in a loop: once a second at most
            self._after(soon, self._replace_guardian)
        else:
            self._replace_guardian()

    def _replace_guardian(self) -> None:
        if self._closing:
            return
        old = self.guardian.pid
        code = self.guardian.replace()
        groups = self.known_groups()
        for pgid, timeout in groups.items():
            self.guardian.watch(pgid, timeout)
        self.guardian.flush()
        log.warning("the guardian process (pid %s) ended (%s); started a new one (pid %s) "
                    "watching %d plugin groups", old,
                    f"signal {-code}" if code is not None and code < 0 else f"code {code}",
                    self.guardian.pid, len(groups))
        self._watch_guardian()

    def _announce(self, pgid: int, stop_timeout: float) -> None:
        """Tell the guardian about a new group.  Where no cgroup holds the run, now, not after
        the batch: process.spawn holds the plugin back until this returns.  In a cgroup the
        run is held from its first instruction (the guardian sweeps the launcher's cgroups if
        the host dies), so the message goes with the others at the end of the loop round."""
        self.guardian.watch(pgid, stop_timeout)
        if self.containment is None or not self.containment.roots:
            self.guardian.flush()

    def _release_containment(self) -> None:
        if self.containment is not None:
            self.containment.close()

    def _request_close(self) -> None:
        self._closing = True

    # ------------------------------------------------------------------------------ commands
    def _new_proc(self, decision: Decision, change: str | None,
                  signature: tuple[Any, ...] | None = None) -> PluginProcess:
        machine = PluginMachine(decision.options, self.clock, self.rng)
        proc = PluginProcess(decision, machine, change=change, signature=signature)
        self.procs[decision.name] = proc
        return proc

    def launch(self, decisions: Iterable[Decision], change: str | None = None) -> None:
        decisions = list(decisions)
        if self.containment is not None:
            self.containment.reserve([(d.name, d.options) for d in decisions
                                      if d.command is not None and d.name not in self.procs])
        try:
            self._launch(decisions, change)
        finally:
            if self.containment is not None:
                self.containment.release()

    def _launch(self, decisions: list[Decision], change: str | None) -> None:
        for decision in decisions:
            old = self.procs.get(decision.name)
            if old is not None and old.state in ACTIVE_STATES:
                continue
            if old is not None and old.held:  # the operator stopped it: only `start` starts it
                old.retarget(decision, change)
                continue
            proc = self._new_proc(decision, change)
            self._feed(proc, proc.machine.start)

    def stop(self, names: Iterable[str] | None = None, timeout: float | None = None) -> None:
        self._ending.hold()  # every group's SIGTERM in one go (one scan of /proc)
        try:
            for name in list(self.procs) if names is None else names:
                proc = self.procs.get(name)
                if proc is not None:
                    self._replacements.pop(name, None)
                    self._feed(proc, functools.partial(proc.machine.stop, timeout))
        finally:
            self._ending.release()

    def replace(self, decision: Decision) -> None:
        """Restart a plugin with a new decision (its file changed): stop, then start anew."""
        proc = self.procs.get(decision.name)
        if proc is None:
            proc = self._new_proc(decision, "changed")
            self._feed(proc, proc.machine.start)
        elif proc.held:  # runs the new file once the operator starts it
            proc.retarget(decision, "changed")
        else:
            self._replacements[decision.name] = decision
            self._feed(proc, proc.machine.replace)

    def quiet(self) -> bool:
        """True once no plugin is active and no process group is still being ended."""
        return not self._ending and all(
            p.state not in ACTIVE_STATES for p in self.procs.values()
        )

    def settled(self) -> bool:
        """True once nothing runs or waits to restart (stopping groups may still be ending)."""
        return not self._replacements and all(
            p.state not in ACTIVE_STATES for p in self.procs.values()
        )

    def kill_all(self) -> None:
        """Last resort (stop_plugins gave up waiting): SIGKILL every known group now."""
        self._ending.kill_all()
        signal_groups([proc.run.pgid for proc in self.procs.values()
                       if proc.run is not None and proc.state in ACTIVE_STATES],
                      signal.SIGKILL)

    def awaited(self) -> list[tuple[str, int, float | None]]:
        """(name, pid, seconds until SIGKILL or None once sent) of each plugin being ended."""
        now = self.clock()
        found = []
        for proc in self.procs.values():
            run = proc.run
            if run is not None and run.pgid in self._ending:
                found.append((proc.name, run.pid, self._ending.left(run.pgid, now)))
        return found

    def status(self) -> list[dict[str, Any]]:
        return [{**p.status(), **self.liveness.view(p), "last_lines": self._last_lines(p.name)}
                for p in self.procs.values()]

    def _last_lines(self, name: str) -> list[str]:
        """The plugin's newest few lines, for the status page (invalid UTF-8 replaced)."""
        ring = self.rings.get(name)
        return [] if ring is None else [line.decode("utf-8", "replace")
                                        for line in ring.last(LAST_LINES)]

    # ------------------------------------------------------- operator requests (on the loop)
    def operator_stop(self, name: str, timeout: float | None = None) -> None:
        """Stop one plugin and hold it stopped (no restart policy, no reload) until started."""
        proc = self.procs[name]
        self._replacements.pop(name, None)
        self._feed(proc, lambda: proc.machine.stop(timeout, hold=True))

    def operator_start(self, name: str) -> bool:
        """Start a plugin that is not running; False if it already runs (nothing to do)."""
        proc = self.procs[name]
        if proc.change == "removed":
            raise OperationError(f"plugin {name} was removed from the plugin locations")
        if proc.state in (State.RUNNING, State.STARTING):
            proc.machine.held = False
            return False
        if proc.state != State.STOPPING:
            log.info("starting plugin %s (operator request)", name)
        self._feed(proc, lambda: proc.machine.start(operator=True))
        return True

    def operator_restart(self, name: str) -> None:
        """Stop (TERM, grace, KILL) and start again; counts in ``restarts``."""
        proc = self.procs[name]
        if proc.change == "removed":
            raise OperationError(f"plugin {name} was removed from the plugin locations")
        if proc.state not in (State.RUNNING, State.STARTING, State.STOPPING):
            log.info("restarting plugin %s (operator request)", name)
        self._replacements.pop(name, None)
        self._feed(proc, proc.machine.restart)

    def operator_signal(self, name: str, sig: int) -> int:
        """Send ``sig`` to the plugin's main process (not its group); returns its PID."""
        proc = self.procs[name]
        run = proc.run
        if run is None or run.returncode is not None or proc.state not in ACTIVE_STATES:
            raise OperationError(f"plugin {name} is not running (state {proc.state})")
        os.kill(run.pid, sig)  # not reaped yet (that happens on this thread): the PID is its
        return run.pid

    def tail(self, name: str, n: int) -> list[bytes]:
        ring = self.rings.get(name)
        return ring.last(n) if ring is not None else []

    def add_tap(self, name: str, tap: Callable[[str, bytes], None]) -> None:
        """Call ``tap(stream, block)`` on the loop for each new block of plugin ``name``."""
        self.taps.setdefault(name, []).append(tap)

    def remove_tap(self, name: str, tap: Callable[[str, bytes], None]) -> None:
        taps = self.taps.get(name, [])
        if tap in taps:
            taps.remove(tap)
        if not taps:
            self.taps.pop(name, None)

    def _log_for(self, proc: PluginProcess) -> RotatingLog | None:
        options = proc.decision.options
        if options.log_file is None:
            return None
        role, worker_id = self.log_fields
        path = os.path.abspath(log_path(options.log_file, proc.name, role, worker_id))
        writer = self._log_files.get(path)
        if writer is None:
            writer = self._log_files[path] = RotatingLog(path, options.log_max_bytes,
                                                         options.log_backups, self.clock)
        return writer

    # --------------------------------------------------------------------------------- loop
    def _loop(self) -> None:
        failures = repeats = 0  # consecutive failed rounds; repeats of the same error
        last: tuple[str, str, int] | None = None
        while not self._closing:
            try:
                self._iterate()
            except Exception as exc:  # never let one bad event end supervision, never spin
                failures += 1
                key = _error_key(exc)
                if key == last:
                    repeats += 1
                    if repeats in (10, 100, 1000) or repeats % 10000 == 0:
                        log.error("the same internal error repeated %d times", repeats)
                else:
                    if repeats:
                        log.error("the previous internal error repeated %d times", repeats)
                    last, repeats = key, 0
                    log.exception("internal error in the plugin supervisor loop")
                first, most = LOOP_ERROR_DELAY
                time.sleep(min(most, first * 2.0 ** min(failures - 1, 20)))
            else:
                if repeats:
                    log.error("the previous internal error repeated %d times", repeats)
                failures = repeats = 0
                last = None

    def _iterate(self) -> None:
        timeout = None
        deadline = self._timers.next_deadline()
        if deadline is not None:
            timeout = min(MAX_SELECT_TIMEOUT, max(0.0, deadline - self.clock()))
        fd_map = self._selector.get_map()
        for key, _mask in self._selector.select(timeout):
            if fd_map.get(key.fd) is not key:
                continue  # closed (or even reused) by an earlier handler of this same round
            if key.data is None:
                self._run_commands()
            elif key.data is _OUTPUTS:
                self._read_outputs()
            elif key.data is not _WRITABLE:
                handler, proc, run = key.data
                handler(proc, run, key.fd)
        for fn in self._timers.due(self.clock()):
            fn()
        self._flow_control()
        if self._changed:
            self._changed = False
            for listener in self.listeners:
                listener()
        if self._status_dirty:
            self._publish_if_due()
        if self._waiters:
            remaining = []
            for predicate, event in self._waiters:
                if predicate():
                    event.set()
                else:
                    remaining.append((predicate, event))
            self._waiters = remaining

    # -------------------------------------------------------------- output path, never blocking
    def _read_outputs(self) -> None:
        """Every plugin pipe that has something, read once (up to 64 KiB each)."""
        fd_map = self._outputs.get_map()
        self._read_full = self._read_data = False
        for key, _mask in self._outputs.select(0):
            if fd_map.get(key.fd) is key:
                handler, proc, run = key.data
                handler(proc, run, key.fd)
        if (self.output_batch > 0 and self._read_data and not self._batch_hold
                and not self._read_full):
            # Low-cost mode: leave the pipes alone for a moment so that the next wake-up (one
            # GIL acquisition in the host) handles many lines; exits, signals, commands and
            # timers still wake the loop at once.  A read that filled its buffer means a
            # flood: no pause then, the pipe is read again at once; nor after end-of-file
            # alone (a run ends only once its pipes are closed).
            self._batch_hold = True
            self._after(self.output_batch, self._end_batch)

    def _end_batch(self) -> None:
        self._batch_hold = False  # the end of this round turns reading back on

    def _set_outputs(self, on: bool) -> None:
        if on != self._outputs_on:
            self._outputs_on = on
            if on:
                self._selector.register(self._outputs.fileno(), selectors.EVENT_READ, _OUTPUTS)
            else:
                self._selector.unregister(self._outputs.fileno())

    def _watch_writable(self, current: int | None, fd: int | None, wanted: bool) -> int | None:
        """Keep ``fd`` registered for EVENT_WRITE exactly while ``wanted``; returns what is."""
        if wanted and current is None and fd is not None:
            self._selector.register(fd, selectors.EVENT_WRITE, _WRITABLE)
            return fd
        if not wanted and current is not None:
            self._selector.unregister(current)
            return None
        return current

    def _flow_control(self) -> None:
        """End of each round: push pending output and guardian messages as far as their readers
        take them now (never waiting), wait for writability where something is left, and read
        plugin pipes only while the sink has room and no batch interval is running."""
        guardian = self.guardian
        guardian.flush()
        self._guardian_fd = self._watch_writable(self._guardian_fd, guardian.fd,
                                                 guardian.wants_write())
        flow = self._flow
        if flow is not None:
            if flow.pending():
                flow.flush()
            self._flow_fd = self._watch_writable(self._flow_fd, flow.fileno(),
                                                 bool(flow.pending()))
            self._sink_hold = flow.full()
        self._set_outputs(not (self._sink_hold or self._batch_hold))

    def _run_commands(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self._commands:
            self._commands.popleft()()

    def _after(self, delay: float, fn: Callable[[], None]) -> Timer:
        """Call ``fn`` on the loop after ``delay`` seconds; ``cancel()`` the handle to drop it."""
        return self._timers.push(self.clock() + delay, fn)

    def publish_status(self) -> None:
        """Refresh ``snapshot``, which the status server reads without calling this thread."""
        self._status_dirty = False
        self._published_at = self.clock()
        self.snapshot = self.status()

    def _publish_if_due(self) -> None:
        due = self._published_at + STATUS_INTERVAL
        if self.clock() >= due:
            self.publish_status()
        elif not self._publish_timer:
            self._publish_timer = True
            self._after(due - self.clock(), self._publish_timer_due)

    def _publish_timer_due(self) -> None:
        self._publish_timer = False  # the end of this loop round publishes

    # -------------------------------------------------------------------------- transitions
    def _feed(self, proc: PluginProcess, event: Callable[[], list[Action]]) -> None:
        """Give ``proc``'s machine one event and carry out the actions it returns.  A transition
        the table does not have is a bug: logged once per kind, never raised into the loop."""
        try:
            actions = event()
        except TransitionError as exc:
            key = (proc.name, str(exc))
            if key not in self._bad_transitions:
                self._bad_transitions.add(key)
                log.error("internal error: plugin %s: %s (event ignored)", proc.name, exc)
            return
        self._changed = True
        self._status_dirty = True
        for action in actions:
            self._do(proc, action)

    def _do(self, proc: PluginProcess, action: Action) -> None:
        if isinstance(action, Spawn):
            self._spawn(proc)
        elif isinstance(action, Terminate):
            if proc.run is not None:
                self._terminate(proc.run, action.grace)
        elif isinstance(action, (Arm, Cancel)):
            kind = action.timer
            old = proc.timers.pop(kind, None)
            if old is not None:
                old.cancel()
            if isinstance(action, Arm):
                proc.timers[kind] = self._after(action.delay, lambda: self._fire(proc, kind))
        elif isinstance(action, Log):
            log.log(action.level, "plugin %s %s", proc.name, action.message)
        elif isinstance(action, Renew):
            decision = self._replacements.pop(proc.name, proc.decision)
            new = self._new_proc(decision, "changed", proc.signature)
            self._feed(new, new.machine.start)

    def _fire(self, proc: PluginProcess, kind: TimerKind) -> None:
        proc.timers.pop(kind, None)
        self._feed(proc, lambda: proc.machine.fired(kind))

    def _spawn(self, proc: PluginProcess) -> None:
        """Carry out ``Spawn``: start a run and tell the machine how that went."""
        decision = proc.decision
        if decision.command is None:
            proc.error = decision.error
            self._feed(proc, lambda: proc.machine.cannot_run(str(decision.error)))
            return
        if not self.liveness.may_spawn(proc):  # scope: host, another launcher runs it
            return
        try:
            run = self._start_run(decision)
        except (OSError, subprocess.SubprocessError) as exc:
            error = proc.error = f"cannot start {decision.command[0]}: {exc}"
            if getattr(exc, "errno", None) == errno.EMFILE:
                soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                error += (f" (this process's open files limit is {soft}, its hard limit "
                          f"{hard}; each plugin holds 3 descriptors here)")
                proc.error = error
            proc.run = None
            self._feed(proc, lambda: proc.machine.spawn_failed(error))
            return
        run.started = self.clock()
        proc.run = run
        self._plugin_logs[proc.name] = self._log_for(proc)
        proc.error = None
        proc.started_wall = run.started_wall
        for fd in run.open_fds:
            self._outputs.register(fd, selectors.EVENT_READ, (self._on_output, proc, run))
        if run.pidfd is not None:
            self._selector.register(run.pidfd, selectors.EVENT_READ, (self._on_exit, proc, run))
        elif not self._poll_timer:
            self._poll_timer = True
            self._after(POLL_WITHOUT_PIDFD, self._poll_exits)
        log.info("started plugin %s (pid %d): %s", proc.name, run.pid, " ".join(decision.command))
        self.liveness.started(proc, run)
        self._feed(proc, proc.machine.spawned)

    def _start_run(self, decision: Decision) -> Run:
        """``spawn``, raising our open files limit when this process is out of descriptors."""
        stop_timeout = decision.options.stop_timeout
        while True:
            env = self.liveness.environment(decision, self.environment(decision))
            try:
                return spawn(decision, env, self.containment,
                             lambda pid: self._announce(pid, stop_timeout))
            except OSError as exc:
                if exc.errno != errno.EMFILE or not limits.raise_open_files():
                    raise

    def _terminate(self, run: Run, grace: float) -> None:
        """SIGTERM the run's group now, SIGKILL it after ``grace`` if still there."""
        self._ending.end(run.pgid, grace, self.clock())
        self._ensure_group_timer()

    # --------------------------------------------------------------------------------- events
    def _on_output(self, proc: PluginProcess, run: Run, fd: int) -> None:
        """Read the pipe; while reads come back large (a flood), read it again at once, up to
        ``FLOOD_READS`` times: one loop round (two polls, timers, flow control) then serves
        up to 512 KiB instead of 64, and the round stays short (about a millisecond)."""
        flow = self._flow
        for _ in range(FLOOD_READS):
            if flow is not None and flow.full():
                return  # left in the pipe; reading pauses at the end of this round
            try:
                chunk = os.read(fd, READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._consume(proc, run, fd, chunk)
                self._maybe_complete(proc, run)
                return
            self._read_data = True
            self._consume(proc, run, fd, chunk)
            if len(chunk) < FLOOD_CHUNK:
                return
            self._read_full = True  # a flood: no low-cost pause after this round

    def _consume(self, proc: PluginProcess, run: Run, fd: int, chunk: bytes) -> None:
        """Pass a chunk on as whole lines; an empty chunk means end of stream."""
        stream = run.open_fds[fd]
        splitter = run.splitters[fd]
        if chunk:
            block = splitter.feed(chunk)
            if stream == "stderr" and proc.decision.options.has_limits and run.limit_hit is None:
                self._check_limit_message(proc, run, chunk)
        else:
            block = splitter.flush()
            self._close_stream(run, fd)
        if block:
            if proc.state is State.STARTING:  # its first line: it has started
                self._feed(proc, proc.machine.output)
            self._status_dirty = True
            count = block.count(b"\n")
            proc.output_lines += count
            self.sink.write(proc.name, stream, block, run.pid)
            ring = self.rings.get(proc.name)
            if ring is None:
                ring = self.rings[proc.name] = RingBuffer()
            ring.add(block, count)
            writer = self._plugin_logs.get(proc.name)
            if writer is not None:
                writer.write(block)
            if self.taps:
                for tap in self.taps.get(proc.name, ()):
                    tap(stream, block)

    def _check_limit_message(self, proc: PluginProcess, run: Run, chunk: bytes) -> None:
        options = proc.decision.options
        for needle, key in limits.LIMIT_MESSAGES.items():
            if needle in chunk and getattr(options, key) is not None:
                run.limit_hit = f"{key}={getattr(options, key)}"
                return

    def _close_stream(self, run: Run, fd: int) -> None:
        self._outputs.unregister(fd)
        del run.open_fds[fd]
        run.pipes.pop(fd).close()

    def _on_exit(self, proc: PluginProcess, run: Run, fd: int) -> None:
        self._selector.unregister(fd)
        os.close(fd)
        run.pidfd = None
        run.returncode = run.popen.wait()
        self._maybe_complete(proc, run)

    def _poll_exits(self) -> None:
        waiting = False
        for proc in list(self.procs.values()):
            run = proc.run
            if run is not None and run.pidfd is None and run.returncode is None:
                code = run.popen.poll()
                if code is None:
                    waiting = True
                else:
                    run.returncode = code
                    self._maybe_complete(proc, run)
        self._poll_timer = waiting
        if waiting:
            self._after(POLL_WITHOUT_PIDFD, self._poll_exits)

    def _maybe_complete(self, proc: PluginProcess, run: Run) -> None:
        """A run is over once its leader is reaped and its pipes are closed (or its group gone)."""
        if run.returncode is None or proc.run is not run or proc.state not in RUN_STATES:
            return
        if run.open_fds:
            if group_alive(run.pgid):
                # Something the plugin started still holds its output: end the group (as
                # systemd ends a unit's leftover processes) and keep reading until it is gone.
                if run.pgid not in self._ending:
                    self._terminate(run, proc.decision.options.stop_timeout)
                return
            self._drain(proc, run)
        if group_alive(run.pgid):
            if run.pgid not in self._ending:
                self._terminate(run, proc.decision.options.stop_timeout)
        elif run.pgid not in self._ending:
            self.guardian.forget(run.pgid)
        self._finish(proc, run)

    def _drain(self, proc: PluginProcess, run: Run) -> None:
        """The group is gone but a pipe is open (held outside it): read what is left, close it."""
        for fd in list(run.open_fds):
            while fd in run.open_fds:
                try:
                    chunk = os.read(fd, READ_SIZE)
                except BlockingIOError:
                    chunk = b""  # nothing buffered: whoever holds it is not the plugin
                except OSError:
                    chunk = b""
                self._consume(proc, run, fd, chunk)

    def _finish(self, proc: PluginProcess, run: Run) -> None:
        """The run is over (leader reaped, output read): its machine decides what follows."""
        code = run.returncode
        assert code is not None
        options = proc.decision.options
        if (cgroups.oom_killed(run.pgid) and run.limit_hit is None and code != 0
                and options.memory_max is not None):
            run.limit_hit = f"memory_max={options.memory_max}"  # its memory cgroup's OOM kill
        if run.limit_hit is None and code < 0:
            run.limit_hit = limits.limit_for_signal(options, -code)
        limit_hit = run.limit_hit
        self.liveness.ended(proc)
        self._feed(proc, lambda: proc.machine.ended(code, limit_hit))

    # ------------------------------------------------------------------------ group endings
    def _ensure_group_timer(self) -> None:
        if not self._group_timer:
            self._group_timer = True
            self._after(GROUP_CHECK, self._check_groups)

    def _check_groups(self) -> None:
        self._group_timer = False  # re-armed below even if something here raises
        try:
            self._end_groups()
        finally:
            if self._ending or any(
                p.run is not None and p.run.returncode is not None and p.run.open_fds
                and p.state in RUN_STATES for p in self.procs.values()
            ):
                self._ensure_group_timer()

    def _end_groups(self) -> None:
        for pgid in self._ending.check(self.clock()):  # gone (or, past SIGKILL, zombies only)
            self.guardian.forget(pgid)
            self._changed = True
        # runs whose leader exited while something outside the group holds their pipes
        for proc in list(self.procs.values()):
            run = proc.run
            if run is not None and run.returncode is not None and run.open_fds:
                self._maybe_complete(proc, run)

