"""One thread, one selector: every plugin's pipes, exits, timers and commands in a single loop.

Waiting is event-driven: output and exits wake the selector (a pidfd per plugin), commands from
other threads arrive through a self-pipe, and timers (backoff, timeouts, stop grace) set the
select timeout.  Nothing polls while nothing is due; the only timed waits are while a process
group is being ended (checked every 50 ms) or on kernels without pidfd.
"""

from __future__ import annotations

import heapq
import inspect
import itertools
import logging
import os
import random
import selectors
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from . import limits
from .guardian import live_groups
from .guardian_client import GuardianClient
from .logs import RingBuffer, RotatingLog, log_path
from .output import Sink, safe_logger
from .plan import Decision
from .process import (
    ACTIVE_STATES,
    PluginProcess,
    Run,
    State,
    after_exit,
    backoff_delay,
    describe_returncode,
    spawn,
)

log = safe_logger("plugin_launcher.supervisor")  # names and paths escaped
T = TypeVar("T")
Timer = tuple[float, int, Callable[[], None]]  # (deadline, sequence, function): a heap entry
READ_SIZE = 1 << 16
GROUP_CHECK = 0.05
POLL_WITHOUT_PIDFD = 0.1
KILL_GRACE = 1.0
MAX_SELECT_TIMEOUT = 3600.0  # epoll refuses ~24.8 days; a later timer is simply waited in steps
LOOP_ERROR_DELAY = (0.01, 1.0)  # a failing loop round waits this long, doubling, before retrying
STATUS_INTERVAL = 0.2  # the published status snapshot is refreshed at most this often


def group_alive(pgid: int) -> bool:
    return bool(live_groups([pgid]))


class OperationError(RuntimeError):
    """An operator request that cannot be done now (e.g. signalling a plugin that is not
    running); the message is one line for the operator."""


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


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


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
    ) -> None:
        self.sink = adapt_sink(sink)
        self.log_fields = log_fields  # role and worker ID, for log_file templates
        self.rings: dict[str, RingBuffer] = {}  # name -> its last lines (survive restarts)
        self.taps: dict[str, list[Callable[[str, bytes], None]]] = {}  # name -> followers
        self._plugin_logs: dict[str, RotatingLog | None] = {}  # name -> its log_file
        self._log_files: dict[str, RotatingLog] = {}  # path -> writer (shared by path)
        self._pending_start: dict[str, bool] = {}  # name -> counts as a restart
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
        self._commands: deque[Callable[[], None]] = deque()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._waiters: list[tuple[Callable[[], bool], threading.Event]] = []
        self._lingering: dict[int, list[float]] = {}  # pgid -> [kill deadline, killed at]
        self._generation: dict[str, int] = {}
        self._replacements: dict[str, Decision] = {}
        self._group_timer = False
        self._poll_timer = False
        self._changed = False
        self._closing = False
        self._timeout_timers: dict[str, Timer] = {}
        self.snapshot: list[dict[str, Any]] = []  # status as last published: read lock-free
        self._status_dirty = False
        self._published_at = float("-inf")
        self._publish_timer = False
        self.guardian = GuardianClient()
        self._thread = threading.Thread(target=self._loop, name="plugin-supervisor", daemon=True)

    # ----------------------------------------------------------------- other threads' interface
    def start(self) -> None:
        self.guardian.start()
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the supervisor thread and return its result."""
        if threading.current_thread() is self._thread or not self._thread.is_alive():
            return fn()
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
        while not done.wait(1.0):
            if not self._thread.is_alive():
                raise RuntimeError("plugin supervisor thread has died")
        if "error" in box:
            raise box["error"]
        return box["result"]  # type: ignore[no-any-return]

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass  # already awake

    def wait_until(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        event = threading.Event()

        def register() -> None:
            if predicate():
                event.set()
            else:
                self._waiters.append((predicate, event))

        self.call(register)
        return event.wait(timeout)

    def close(self) -> None:
        """End the loop thread (plugins must already be stopped) and release the guardian."""
        if self._thread.is_alive():
            self.call(self._request_close)
            self._thread.join()
        self.guardian.close()
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

    def _request_close(self) -> None:
        self._closing = True

    # ------------------------------------------------------------------------------ commands
    def launch(self, decisions: Iterable[Decision], change: str | None = None) -> None:
        for decision in decisions:
            proc = PluginProcess(decision, change=change)
            old = self.procs.get(decision.name)
            if old is not None and old.state in ACTIVE_STATES:
                continue
            if old is not None and old.held:  # the operator stopped it: only `start` starts it
                old.decision, old.change = decision, change
                continue
            self.procs[decision.name] = proc
            self._start(proc)

    def stop(self, names: Iterable[str] | None = None, timeout: float | None = None) -> None:
        for name in list(self.procs) if names is None else names:
            proc = self.procs.get(name)
            if proc is not None:
                self._replacements.pop(name, None)
                self._pending_start.pop(name, None)
                self._stop(proc, timeout)

    def replace(self, decision: Decision) -> None:
        """Restart a plugin with a new decision (its file changed): stop, then start anew."""
        proc = self.procs.get(decision.name)
        if proc is not None and proc.held:  # runs the new file once the operator starts it
            proc.decision, proc.change = decision, "changed"
            return
        if proc is None or proc.state not in ACTIVE_STATES:
            self.procs[decision.name] = PluginProcess(decision, change="changed")
            self._start(self.procs[decision.name])
            return
        self._replacements[decision.name] = decision
        self._stop(proc, None)

    def quiet(self) -> bool:
        """True once no plugin is active and no process group is still being ended."""
        return not self._lingering and all(
            p.state not in ACTIVE_STATES for p in self.procs.values()
        )

    def settled(self) -> bool:
        """True once nothing runs or waits to restart (stopping groups may still be ending)."""
        return not self._replacements and all(
            p.state not in ACTIVE_STATES for p in self.procs.values()
        )

    def kill_all(self) -> None:
        """Last resort (stop_plugins gave up waiting): SIGKILL every known group now."""
        for pgid in list(self._lingering):
            signal_group(pgid, signal.SIGKILL)
        for proc in self.procs.values():
            if proc.run is not None and proc.state in ACTIVE_STATES:
                signal_group(proc.run.pgid, signal.SIGKILL)

    def awaited(self) -> list[tuple[str, int, float | None]]:
        """(name, pid, seconds until SIGKILL or None once sent) of each plugin being ended."""
        now = self.clock()
        found = []
        for proc in self.procs.values():
            run = proc.run
            entry = self._lingering.get(run.pgid) if run is not None else None
            if run is not None and entry is not None:
                found.append((proc.name, run.pid, None if entry[1] else max(0.0, entry[0] - now)))
        return found

    def status(self) -> list[dict[str, Any]]:
        return [p.status() for p in self.procs.values()]

    # ------------------------------------------------------- operator requests (on the loop)
    def operator_stop(self, name: str, timeout: float | None = None) -> None:
        """Stop one plugin and hold it stopped (no restart policy, no reload) until started."""
        proc = self.procs[name]
        proc.held = True
        self._replacements.pop(name, None)
        self._pending_start.pop(name, None)
        self._stop(proc, timeout)

    def operator_start(self, name: str) -> bool:
        """Start a plugin that is not running; False if it already runs (nothing to do)."""
        proc = self.procs[name]
        if proc.change == "removed":
            raise OperationError(f"plugin {name} was removed from the plugin locations")
        proc.held = False
        if proc.state in (State.RUNNING, State.STARTING):
            return False
        if proc.state == State.STOPPING:
            self._pending_start.setdefault(name, False)
            return True
        if proc.state == State.BACKOFF:
            self._generation[name] += 1  # cancels the pending restart: start now instead
        log.info("starting plugin %s (operator request)", name)
        proc.backoff_step = 0
        self._start(proc)
        return True

    def operator_restart(self, name: str) -> None:
        """Stop (TERM, grace, KILL) and start again; counts in ``restarts``."""
        proc = self.procs[name]
        if proc.change == "removed":
            raise OperationError(f"plugin {name} was removed from the plugin locations")
        proc.held = False
        if proc.state in (State.RUNNING, State.STARTING, State.STOPPING):
            self._pending_start[name] = True
            self._stop(proc, None)
            return
        if proc.state == State.BACKOFF:
            self._generation[name] += 1
        log.info("restarting plugin %s (operator request)", name)
        proc.restarts += 1
        proc.backoff_step = 0
        self._start(proc)

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
        if self._timers:
            timeout = min(MAX_SELECT_TIMEOUT, max(0.0, self._timers[0][0] - self.clock()))
        fd_map = self._selector.get_map()
        for key, _mask in self._selector.select(timeout):
            if fd_map.get(key.fd) is not key:
                continue  # closed (or even reused) by an earlier handler of this same round
            if key.data is None:
                self._run_commands()
            else:
                handler, proc, run = key.data
                handler(proc, run, key.fd)
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            fn()
        self.guardian.flush()
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

    def _run_commands(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self._commands:
            self._commands.popleft()()

    def _after(self, delay: float, fn: Callable[[], None]) -> Timer:
        entry = (self.clock() + delay, next(self._seq), fn)
        heapq.heappush(self._timers, entry)
        return entry

    def _cancel(self, entry: Timer | None) -> None:
        """Drop a pending timer now (a run's timeout must not outlive the run)."""
        if entry is not None and entry in self._timers:
            self._timers.remove(entry)
            heapq.heapify(self._timers)

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

    def _set_state(self, proc: PluginProcess, state: State) -> None:
        proc.state = state
        self._changed = True
        self._status_dirty = True

    # -------------------------------------------------------------------------- transitions
    def _start(self, proc: PluginProcess) -> None:
        generation = self._generation.get(proc.name, 0) + 1
        self._generation[proc.name] = generation
        decision = proc.decision
        if decision.command is None:
            proc.error = decision.error
            log.error("plugin %s cannot run: %s", proc.name, decision.error)
            self._set_state(proc, State.FAILED)
            proc.last_failure = True
            return
        self._set_state(proc, State.STARTING)
        try:
            run = spawn(decision, self.environment(decision))
        except (OSError, subprocess.SubprocessError) as exc:
            proc.error = f"cannot start {decision.command[0]}: {exc}"
            proc.run = None
            self._finish(proc, failure=True)
            return
        run.started = self.clock()
        proc.run = run
        self._plugin_logs[proc.name] = self._log_for(proc)
        proc.error = None
        proc.started_wall = run.started_wall
        self.guardian.watch(run.pgid, decision.options.stop_timeout)
        for fd in run.open_fds:
            self._selector.register(fd, selectors.EVENT_READ, (self._on_output, proc, run))
        if run.pidfd is not None:
            self._selector.register(run.pidfd, selectors.EVENT_READ, (self._on_exit, proc, run))
        elif not self._poll_timer:
            self._poll_timer = True
            self._after(POLL_WITHOUT_PIDFD, self._poll_exits)
        self._set_state(proc, State.RUNNING)
        log.info("started plugin %s (pid %d): %s", proc.name, run.pid, " ".join(decision.command))
        timeout = decision.options.timeout
        if timeout is not None:
            self._cancel(self._timeout_timers.pop(proc.name, None))
            self._timeout_timers[proc.name] = self._after(
                timeout, lambda: self._on_timeout(proc, run))

    def _stop(self, proc: PluginProcess, timeout: float | None) -> None:
        grace = proc.decision.options.stop_timeout if timeout is None else timeout
        if proc.state == State.BACKOFF:
            self._generation[proc.name] += 1  # cancels the pending restart
            self._set_state(proc, State.STOPPED)
            return
        run = proc.run
        if run is None or proc.state not in ACTIVE_STATES:
            return
        if run.stop_requested:
            return
        run.stop_requested = True
        self._set_state(proc, State.STOPPING)
        self._terminate(run, grace)

    def _terminate(self, run: Run, grace: float) -> None:
        """SIGTERM the run's group now, SIGKILL it after ``grace`` if still there."""
        signal_group(run.pgid, signal.SIGTERM)
        entry = self._lingering.get(run.pgid)
        deadline = self.clock() + grace
        if entry is None:
            self._lingering[run.pgid] = [deadline, 0.0]
        elif not entry[1]:
            entry[0] = min(entry[0], deadline)
        self._ensure_group_timer()

    def _on_timeout(self, proc: PluginProcess, run: Run) -> None:
        if proc.run is not run or run.returncode is not None or run.stop_requested:
            return
        run.timed_out = True
        log.warning("plugin %s timed out after %gs; stopping it", proc.name,
                    proc.decision.options.timeout)
        self._set_state(proc, State.STOPPING)
        self._terminate(run, proc.decision.options.stop_timeout)

    # --------------------------------------------------------------------------------- events
    def _on_output(self, proc: PluginProcess, run: Run, fd: int) -> None:
        try:
            chunk = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        self._consume(proc, run, fd, chunk)
        if not chunk:
            self._maybe_complete(proc, run)

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
        self._selector.unregister(fd)
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
        if run.returncode is None or proc.run is not run or proc.state not in ACTIVE_STATES:
            return
        if run.open_fds:
            if group_alive(run.pgid):
                # Something the plugin started still holds its output: end the group (as
                # systemd ends a unit's leftover processes) and keep reading until it is gone.
                if run.pgid not in self._lingering:
                    self._terminate(run, proc.decision.options.stop_timeout)
                return
            self._drain(proc, run)
        if group_alive(run.pgid):
            if run.pgid not in self._lingering:
                self._terminate(run, proc.decision.options.stop_timeout)
        elif run.pgid not in self._lingering:
            self.guardian.forget(run.pgid)
        self._finish(proc, failure=None)

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

    def _finish(self, proc: PluginProcess, failure: bool | None) -> None:
        run = proc.run
        self._cancel(self._timeout_timers.pop(proc.name, None))  # the run is over
        options = proc.decision.options
        if run is not None and failure is None:
            code = run.returncode
            assert code is not None
            proc.last_returncode = code
            if run.limit_hit is None and code < 0:
                run.limit_hit = limits.limit_for_signal(options, -code)
            failure = code != 0 or run.timed_out or run.limit_hit is not None
            what = describe_returncode(code)
            if run.timed_out:
                what += f" (timed out after {options.timeout:g}s)"
            if run.limit_hit is not None:
                what += f" (stopped by limit {run.limit_hit})"
            stop_requested = run.stop_requested
        else:
            what = f"could not start ({proc.error})"
            stop_requested = False
        failure = bool(failure)
        proc.last_failure = failure
        if run is not None and proc.started_wall is not None:
            if self.clock() - run.started >= options.backoff_reset:
                proc.backoff_step = 0
        replacement = self._replacements.pop(proc.name, None)
        counts = self._pending_start.pop(proc.name, None)
        if counts is not None and replacement is None:  # operator start / restart
            log.info("plugin %s %s; %s (operator request)", proc.name, what,
                     "restarting" if counts else "starting")
            if counts:
                proc.restarts += 1
            proc.backoff_step = 0
            self._start(proc)
            return
        if replacement is not None:
            log.info("plugin %s %s; restarting changed plugin", proc.name, what)
            new = PluginProcess(replacement, change="changed", signature=proc.signature)
            self.procs[proc.name] = new
            self._start(new)
            return
        outcome = after_exit(options.restart, options.max_restarts, proc.restarts, failure,
                             stop_requested)
        level = logging.WARNING if failure and not stop_requested else logging.INFO
        if run is None:
            level = logging.ERROR
        if outcome.state == State.BACKOFF:
            delay = backoff_delay(options.backoff_initial, options.backoff_max,
                                  proc.backoff_step, self.rng)
            proc.backoff_step += 1
            limit = f" of {options.max_restarts}" if options.max_restarts else ""
            log.log(level, "plugin %s %s; restarting in %.1fs (restart %d%s)", proc.name, what,
                    delay, proc.restarts + 1, limit)
            generation = self._generation[proc.name]
            self._set_state(proc, State.BACKOFF)
            self._after(delay, lambda: self._restart(proc, generation))
            return
        if outcome.state == State.FAILED:
            log.error("plugin %s %s; %s", proc.name, what, outcome.message)
        elif outcome.state == State.STOPPED:
            log.info("plugin %s stopped (%s)", proc.name, what)
        else:
            log.log(level, "plugin %s %s", proc.name, what)
        self._set_state(proc, outcome.state)

    def _restart(self, proc: PluginProcess, generation: int) -> None:
        if self._generation.get(proc.name) != generation or proc.state != State.BACKOFF:
            return
        if self.procs.get(proc.name) is not proc:
            return
        proc.restarts += 1
        self._start(proc)

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
            if self._lingering or any(
                p.run is not None and p.run.returncode is not None and p.run.open_fds
                and p.state in ACTIVE_STATES for p in self.procs.values()
            ):
                self._ensure_group_timer()

    def _end_groups(self) -> None:
        now = self.clock()
        alive = live_groups(list(self._lingering))
        for pgid, entry in list(self._lingering.items()):
            deadline, killed_at = entry
            if pgid not in alive:
                del self._lingering[pgid]
                self.guardian.forget(pgid)
                self._changed = True
            elif killed_at:
                if now - killed_at > KILL_GRACE:  # only zombies can remain: stop waiting
                    del self._lingering[pgid]
                    self._changed = True
            elif now >= deadline:
                signal_group(pgid, signal.SIGKILL)
                entry[1] = now
        # runs whose leader exited while something outside the group holds their pipes
        for proc in list(self.procs.values()):
            run = proc.run
            if run is not None and run.returncode is not None and run.open_fds:
                self._maybe_complete(proc, run)

