"""The supervision policy of one plugin: an explicit state machine, driven by events, that
returns actions; no processes, no threads, no wall clock.

supervisord's process state machine is the model (its FATAL is our ``failed``)::

    stopped/exited/failed --start--> starting --up--> running
    starting/running --stop, timeout--> stopping
    starting/running/stopping --exit--> exited | --retry--> backoff | --give-up--> failed
    stopping --stopped--> stopped | --start--> starting (an operator restart, a changed file)
    backoff --restart (its timer), start (operator)--> starting | --stop--> stopped

Every state change goes through ``transition`` and is checked against ``TRANSITIONS``: a pair
that is not in the table is a bug, reported as ``TransitionError`` (the supervisor logs it once
and carries on).  ``PluginMachine`` takes events (``start``, ``spawned``, ``output``, ``fired``,
``stop``, ``replace``, ``ended`` ...) and returns the actions the supervisor must carry out
(``Spawn``, ``Terminate``, ``Arm``, ``Cancel``, ``Log``, ``Renew``); its clock and random number
generator are injected, so the restart, backoff, timeout and stop rules are unit-tested without
processes and without waiting (tests/test_machine.py).

A plugin is ``starting`` from its spawn until it has run for ``STARTSECS`` or printed its first
output line, whichever comes first; then ``running``.  A run that ends while ``starting`` is
judged like any other (its restart policy decides), unlike supervisord's start retries.
A ``ready: notify`` plugin stays ``starting`` until it sends READY=1 (``ready``), and its run
fails if that does not come within ``ready_timeout``; a missed watchdog (``watchdog_missed``)
ends the run as a failure the same way.  A ``scope: host`` plugin whose host lock another
launcher holds waits in ``standby`` (no process) until the supervisor takes the lock over.
"""

from __future__ import annotations

import logging
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal, Protocol

STARTSECS = 0.2  # a run counts as started (running) after this long, or at its first line


class State(str, Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    EXITED = "exited"
    FAILED = "failed"
    STOPPED = "stopped"
    STANDBY = "standby"  # scope: host, another launcher of the host runs it

    def __str__(self) -> str:
        return self.value


ACTIVE_STATES = frozenset({State.STARTING, State.RUNNING, State.BACKOFF, State.STOPPING,
                           State.STANDBY})
RUN_STATES = frozenset({State.STARTING, State.RUNNING, State.STOPPING})  # a process exists


class Event(str, Enum):
    START = "start"  # spawn a run (launch, operator start, after a stop)
    RESTART = "restart"  # the backoff is over: spawn the next run
    UP = "up"  # the run has lasted STARTSECS or printed a line
    STOP = "stop"  # stop requested (operator, host, reload): end the run, do not restart
    TIMEOUT = "timeout"  # the run's ``timeout`` expired: end it, a failure
    EXIT = "exit"  # the run ended and is not restarted
    RETRY = "retry"  # the run ended (or could not start): restart after a backoff
    GIVE_UP = "give-up"  # past max_restarts, or the plugin cannot run (or start) at all
    STOPPED = "stopped"  # the run ended after a stop
    STANDBY = "standby"  # scope: host: another launcher holds the host lock; no run here

    def __str__(self) -> str:
        return self.value


_S, _E = State, Event
TRANSITIONS: dict[tuple[State, Event], State] = {
    **{(s, _E.START): _S.STARTING for s in (_S.STOPPED, _S.EXITED, _S.FAILED, _S.BACKOFF,
                                            _S.STOPPING, _S.STANDBY)},
    (_S.STARTING, _E.STANDBY): _S.STANDBY,
    (_S.STANDBY, _E.STOP): _S.STOPPED,
    (_S.BACKOFF, _E.RESTART): _S.STARTING,
    (_S.STARTING, _E.UP): _S.RUNNING,
    **{(s, e): _S.STOPPING for s in (_S.STARTING, _S.RUNNING) for e in (_E.STOP, _E.TIMEOUT)},
    (_S.BACKOFF, _E.STOP): _S.STOPPED,
    **{(s, _E.EXIT): _S.EXITED for s in RUN_STATES},
    **{(s, _E.RETRY): _S.BACKOFF for s in RUN_STATES},
    **{(s, _E.GIVE_UP): _S.FAILED for s in RUN_STATES},
    (_S.STOPPING, _E.STOPPED): _S.STOPPED,
}


class TransitionError(RuntimeError):
    """An event that has no transition from the current state: a bug in the supervisor."""


def transition(state: State, event: Event) -> State:
    """The state ``event`` leads to from ``state``; TransitionError if the table has none."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise TransitionError(f"no transition from {state} on {event}") from None


# ------------------------------------------------------------------------- pure policy rules
@dataclass(frozen=True)
class Outcome:
    state: State
    message: str


def after_exit(
    restart: str, max_restarts: int, restarts: int, failure: bool, stop_requested: bool
) -> Outcome:
    """The state a plugin goes to when a run ends (supervisord's FATAL is our ``failed``)."""
    if stop_requested:
        return Outcome(State.STOPPED, "stopped")
    wants_restart = restart == "always" or (restart == "on-failure" and failure)
    if not wants_restart:
        return Outcome(State.EXITED, f"not restarted (restart: {restart})")
    if max_restarts and restarts >= max_restarts:
        return Outcome(State.FAILED, f"giving up after {restarts} restarts")
    return Outcome(State.BACKOFF, "restarting")


def backoff_delay(initial: float, maximum: float, step: int, rng: random.Random) -> float:
    """Doubling delay with jitter (never above ``maximum``), so a crash loop costs nothing."""
    base = min(maximum, initial * (2.0 ** min(step, 60)))
    return base * rng.uniform(0.8, 1.0)


# ------------------------------------------------------------- what a return code means
def split_returncode(code: int) -> tuple[int | None, int | None]:
    """(exit code, signal number) of a Popen return code: one of them is None."""
    return (None, -code) if code < 0 else (code, None)


def signal_name(number: int) -> str | None:
    try:
        return signal.Signals(number).name
    except ValueError:
        return None


def describe_returncode(code: int) -> str:
    exit_code, number = split_returncode(code)
    if number is not None:
        return f"killed by {signal_name(number) or f'signal {number}'}"
    return f"exited with code {exit_code}"


def shell_status(code: int) -> int:
    """The exit status a shell reports for ``code``: the code itself, or 128+N for signal N."""
    exit_code, number = split_returncode(code)
    if number is not None:
        return 128 + number
    assert exit_code is not None
    return exit_code


# --------------------------------------------------------------------------------- actions
TimerKind = Literal["up", "timeout", "backoff", "ready"]
RUN_TIMERS: tuple[TimerKind, ...] = ("up", "timeout", "ready")  # dropped when a run ends


@dataclass(frozen=True)
class Spawn:
    """Start a run; answer with ``spawned``, ``spawn_failed`` or ``cannot_run``."""


@dataclass(frozen=True)
class Terminate:
    """SIGTERM the run's process group now, SIGKILL it after ``grace`` seconds."""

    grace: float


@dataclass(frozen=True)
class Arm:
    """Call ``fired(timer)`` after ``delay`` seconds (replaces an armed timer of that kind)."""

    timer: TimerKind
    delay: float


@dataclass(frozen=True)
class Cancel:
    timer: TimerKind


@dataclass(frozen=True)
class Log:
    """One line about the plugin: ``plugin <name> <message>``."""

    level: int
    message: str


@dataclass(frozen=True)
class Renew:
    """Its file changed and the old run is over: start afresh with the new file."""


Action = Spawn | Terminate | Arm | Cancel | Log | Renew


class Options(Protocol):
    """The part of ``PluginOptions`` the policy reads."""

    @property
    def restart(self) -> str: ...
    @property
    def max_restarts(self) -> int: ...
    @property
    def backoff_initial(self) -> float: ...
    @property
    def backoff_max(self) -> float: ...
    @property
    def backoff_reset(self) -> float: ...
    @property
    def stop_timeout(self) -> float: ...
    @property
    def timeout(self) -> float | None: ...
    @property
    def ready(self) -> str | None: ...
    @property
    def ready_timeout(self) -> float: ...


Pending = Literal["start", "restart", "replace"]


@dataclass
class PluginMachine:
    """One plugin's supervision state; each event method returns the actions to carry out."""

    options: Options
    clock: Callable[[], float]
    rng: random.Random = field(default_factory=random.Random)
    state: State = State.STOPPED
    restarts: int = 0
    backoff_step: int = 0
    held: bool = False  # stopped by the operator: no restart, no reload starts it until start
    pending: Pending | None = None  # what to do once the current run is over
    armed: set[str] = field(default_factory=set)
    last_returncode: int | None = None
    last_failure: bool = False
    run_started: float | None = None
    stop_requested: bool = False
    timed_out: bool = False
    ended_by: str | None = None  # why the supervisor ended the run (not ready, watchdog)

    # ---------------------------------------------------------------------------- helpers
    def _go(self, event: Event) -> None:
        self.state = transition(self.state, event)

    def _arm(self, timer: TimerKind, delay: float) -> Arm:
        self.armed.add(timer)
        return Arm(timer, delay)

    def _cancel(self, *timers: TimerKind) -> list[Action]:
        found: list[Action] = [Cancel(t) for t in timers if t in self.armed]
        self.armed.difference_update(timers)
        return found

    def _spawn(self, event: Event = Event.START) -> list[Action]:
        self._go(event)
        self.run_started = None
        self.stop_requested = self.timed_out = False
        self.ended_by = None
        return [Spawn()]

    # ----------------------------------------------------------------------------- events
    def start(self, *, counts: bool = False, operator: bool = False) -> list[Action]:
        """Start now (or, while stopping, once the run is over).  ``counts``: a restart.
        ``operator``: ends a hold and resets the backoff.  No action if already running."""
        if operator:
            self.held = False
        if self.state in (State.STARTING, State.RUNNING):
            return []
        if self.state == State.STOPPING:
            if counts or self.pending is None:
                self.pending = "restart" if counts else "start"
            return []
        actions = self._cancel("backoff")
        if counts:
            self.restarts += 1
        if operator:
            self.backoff_step = 0
        self.pending = None
        return actions + self._spawn()

    def restart(self) -> list[Action]:
        """The operator's restart: end the run if any, then start again (counts in restarts)."""
        self.held = False
        if self.state in RUN_STATES:
            actions = self.stop()
            self.pending = "restart"
            return actions
        return self.start(counts=True, operator=True)

    def spawned(self) -> list[Action]:
        """The run's process exists (it is ``starting``)."""
        self.run_started = self.clock()
        if self.options.ready == "notify":  # starting until READY=1, not until a first line
            actions: list[Action] = [self._arm("ready", self.options.ready_timeout)]
        else:
            actions = [self._arm("up", STARTSECS)]
        if self.options.timeout is not None:
            actions.append(self._arm("timeout", self.options.timeout))
        return actions

    def output(self) -> list[Action]:
        """The run printed a line: it has started (a ``ready: notify`` run waits for READY=1)."""
        if self.state != State.STARTING or self.options.ready == "notify":
            return []
        self._go(Event.UP)
        return self._cancel("up")

    def ready(self) -> list[Action]:
        """The run sent READY=1: a ``ready: notify`` plugin is running from now on."""
        if self.state != State.STARTING or self.options.ready != "notify":
            return []
        self._go(Event.UP)
        return [*self._cancel("ready"), Log(logging.INFO, "is ready")]

    def extend_ready(self, delay: float) -> list[Action]:
        """EXTEND_TIMEOUT_USEC while starting: READY=1 may now come within ``delay`` seconds."""
        if self.state != State.STARTING or "ready" not in self.armed:
            return []
        return [self._arm("ready", delay)]

    def watchdog_missed(self, why: str) -> list[Action]:
        """The run missed its watchdog (or asked for it: WATCHDOG=trigger): end it, a failure
        under the restart policy."""
        return self._end_run(why, f"{why}; stopping it as a failure")

    def _end_run(self, why: str, message: str) -> list[Action]:
        if self.state not in (State.STARTING, State.RUNNING):
            return []
        self.ended_by = why
        self._go(Event.TIMEOUT)
        return [*self._cancel(*RUN_TIMERS), Log(logging.WARNING, message),
                Terminate(self.options.stop_timeout)]

    def standby(self) -> list[Action]:
        """Instead of a spawn: another launcher of the host runs this ``scope: host`` plugin."""
        self._go(Event.STANDBY)
        return []

    def fired(self, timer: TimerKind) -> list[Action]:
        """A timer armed by this machine went off (cancelled timers never fire)."""
        self.armed.discard(timer)
        if timer == "up":
            return self.output()
        if timer == "timeout":
            return self.timeout()
        if timer == "ready":
            limit = f"{self.options.ready_timeout:g}s"
            return self._end_run(f"not ready after {limit}", f"sent no READY=1 within {limit} "
                                 "(ready_timeout); stopping it as a failure")
        actions = self._spawn(Event.RESTART)  # checked first: a refused event changes nothing
        self.restarts += 1
        return actions

    def timeout(self) -> list[Action]:
        if self.state not in (State.STARTING, State.RUNNING):
            return []
        self.timed_out = True
        self._go(Event.TIMEOUT)
        return [*self._cancel(*RUN_TIMERS),
                Log(logging.WARNING, f"timed out after {self.options.timeout:g}s; stopping it"),
                Terminate(self.options.stop_timeout)]

    def stop(self, grace: float | None = None, *, hold: bool = False) -> list[Action]:
        """End the run (TERM, KILL after ``grace``) and do not restart; ``hold``: the operator's
        stop, which lasts until an operator start."""
        if hold:
            self.held = True
        self.pending = None
        grace = self.options.stop_timeout if grace is None else grace
        if self.state == State.BACKOFF:
            actions = self._cancel("backoff")
            self._go(Event.STOP)
            return actions
        if self.state == State.STANDBY:
            self._go(Event.STOP)
            return []
        if self.state == State.STOPPING:
            if self.stop_requested:
                return []
            self.stop_requested = True  # it was timing out: now it ends as stopped
            return [Terminate(grace)]
        if self.state not in (State.STARTING, State.RUNNING):
            return []
        self.stop_requested = True
        self._go(Event.STOP)
        return [*self._cancel(*RUN_TIMERS), Terminate(grace)]

    def replace(self) -> list[Action]:
        """The plugin's file changed: end the run if any, then ``Renew``.  A held plugin is
        left alone (the new file runs once the operator starts it)."""
        if self.held:
            return []
        if self.state in (State.STARTING, State.RUNNING):
            actions = self.stop()
            self.pending = "replace"
            return actions
        if self.state == State.STOPPING:
            self.pending = "replace"
            return []
        actions = self._cancel("backoff")
        if self.state in (State.BACKOFF, State.STANDBY):
            self._go(Event.STOP)
        return [*actions, Renew()]

    def cannot_run(self, error: str) -> list[Action]:
        """The plugin has no command (refused, unreadable): give up at once."""
        self.last_failure = True
        self._go(Event.GIVE_UP)
        return [*self._cancel(*RUN_TIMERS), Log(logging.ERROR, f"cannot run: {error}")]

    def spawn_failed(self, error: str) -> list[Action]:
        """The run could not be spawned: a failed run (its restart policy decides); one that is
        not restarted is ``failed``, like a plugin that cannot run at all, never ``exited``."""
        return self._over(f"could not start ({error})", failure=True, level=logging.ERROR,
                          started=False)

    def ended(self, returncode: int, limit_hit: str | None = None) -> list[Action]:
        """The run is over: its leader is reaped and its output read to the end."""
        self.last_returncode = returncode
        what = describe_returncode(returncode)
        if self.timed_out:
            what += f" (timed out after {self.options.timeout:g}s)"
        if limit_hit is not None:
            what += f" (stopped by limit {limit_hit})"
        if self.ended_by is not None:
            what += f" ({self.ended_by})"
        failure = (returncode != 0 or self.timed_out or limit_hit is not None
                   or self.ended_by is not None)
        if self.run_started is not None:
            if self.clock() - self.run_started >= self.options.backoff_reset:
                self.backoff_step = 0
        level = logging.WARNING if failure and not self.stop_requested else logging.INFO
        return self._over(what, failure=failure, level=level)

    def _over(self, what: str, *, failure: bool, level: int,
              started: bool = True) -> list[Action]:
        actions = self._cancel(*RUN_TIMERS)
        self.last_failure = failure
        pending, self.pending = self.pending, None
        if pending == "replace":
            self._go(Event.STOPPED)
            return [*actions, Log(logging.INFO, f"{what}; restarting changed plugin"), Renew()]
        if pending is not None:
            verb = "restarting" if pending == "restart" else "starting"
            actions.append(Log(logging.INFO, f"{what}; {verb} (operator request)"))
            if pending == "restart":
                self.restarts += 1
            self.backoff_step = 0
            return actions + self._spawn()
        options = self.options
        outcome = after_exit(options.restart, options.max_restarts, self.restarts, failure,
                             self.stop_requested)
        if outcome.state == State.BACKOFF:
            delay = backoff_delay(options.backoff_initial, options.backoff_max,
                                  self.backoff_step, self.rng)
            self.backoff_step += 1
            limit = f" of {options.max_restarts}" if options.max_restarts else ""
            self._go(Event.RETRY)
            return [*actions, Log(level, f"{what}; restarting in {delay:.1f}s (restart "
                                         f"{self.restarts + 1}{limit})"),
                    self._arm("backoff", delay)]
        if outcome.state == State.FAILED or (outcome.state == State.EXITED and not started):
            self._go(Event.GIVE_UP)
            return [*actions, Log(logging.ERROR, f"{what}; {outcome.message}")]
        if outcome.state == State.STOPPED:
            self._go(Event.STOPPED)
            return [*actions, Log(logging.INFO, f"stopped ({what})")]
        self._go(Event.EXIT)
        return [*actions, Log(level, what)]
