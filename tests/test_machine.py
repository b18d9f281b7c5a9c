"""The supervision policy without processes or the wall clock: events in, actions and states out.

Every test drives a ``PluginMachine`` with an injected clock and random number generator, so
restart, backoff, timeout, stop, replace and hold rules are checked in milliseconds; the
end-to-end tests (test_supervision.py, test_control.py, test_reload.py) check the same rules
with real processes.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import pytest

from plugin_launcher.guardian import GroupEnder
from plugin_launcher.machine import (
    STARTSECS,
    TRANSITIONS,
    Action,
    Arm,
    Cancel,
    Event,
    Log,
    PluginMachine,
    Renew,
    Spawn,
    State,
    Terminate,
    TransitionError,
    after_exit,
    backoff_delay,
    describe_returncode,
    shell_status,
    split_returncode,
    transition,
)
from plugin_launcher.options import PluginOptions
from plugin_launcher.plan import Decision
from plugin_launcher.process import PluginProcess
from plugin_launcher.supervisor import Supervisor
from plugin_launcher.timers import TimerHeap


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def machine(clock: Clock | None = None, seed: int = 1, **options: Any) -> PluginMachine:
    return PluginMachine(PluginOptions(**options), clock or Clock(), random.Random(seed))


def running(m: PluginMachine) -> PluginMachine:
    """Start ``m`` and let its run count as started."""
    assert m.start() == [Spawn()]
    m.spawned()
    m.fired("up")
    assert m.state == State.RUNNING
    return m


def messages(actions: list[Action]) -> list[str]:
    return [a.message for a in actions if isinstance(a, Log)]


def kinds(actions: list[Action]) -> list[type]:
    return [type(a) for a in actions]


def backoff_of(actions: list[Action]) -> float:
    (arm,) = [a for a in actions if isinstance(a, Arm) and a.timer == "backoff"]
    return arm.delay


# ------------------------------------------------------------------------------- the table
def test_every_state_has_a_way_out_and_starting_leads_to_running() -> None:
    sources = {state for state, _ in TRANSITIONS}
    assert sources == set(State)
    assert transition(State.STARTING, Event.UP) == State.RUNNING
    assert transition(State.BACKOFF, Event.STOP) == State.STOPPED
    assert transition(State.STOPPING, Event.STOPPED) == State.STOPPED


@pytest.mark.parametrize("state, event", [
    (State.BACKOFF, Event.EXIT), (State.STOPPED, Event.UP), (State.RUNNING, Event.START),
    (State.EXITED, Event.STOP), (State.FAILED, Event.RETRY), (State.RUNNING, Event.STOPPED),
    (State.FAILED, Event.RESTART), (State.STOPPED, Event.RESTART),
])
def test_a_transition_not_in_the_table_is_an_error(state: State, event: Event) -> None:
    with pytest.raises(TransitionError, match=f"from {state} on {event}"):
        transition(state, event)


def test_a_timer_firing_in_the_wrong_state_is_refused_not_obeyed() -> None:
    m = running(machine())
    with pytest.raises(TransitionError):
        m.fired("backoff")  # a backoff timer can only fire in backoff
    assert m.state == State.RUNNING and m.restarts == 0


# ------------------------------------------------------------------------- pure policy rules
@pytest.mark.parametrize("restart, max_restarts, restarts, failure, stop, expected", [
    ("never", 5, 0, True, False, State.EXITED),
    ("never", 5, 0, False, False, State.EXITED),
    ("on-failure", 5, 0, False, False, State.EXITED),
    ("on-failure", 5, 0, True, False, State.BACKOFF),
    ("on-failure", 5, 5, True, False, State.FAILED),
    ("always", 5, 4, False, False, State.BACKOFF),
    ("always", 5, 5, False, False, State.FAILED),
    ("always", 0, 10_000, True, False, State.BACKOFF),  # 0: no limit
    ("always", 5, 0, True, True, State.STOPPED),  # a requested stop is never restarted
])
def test_after_exit(restart: str, max_restarts: int, restarts: int, failure: bool, stop: bool,
                    expected: State) -> None:
    assert after_exit(restart, max_restarts, restarts, failure, stop).state == expected


@pytest.mark.parametrize("step, low, high", [
    (0, 0.8, 1.0), (1, 1.6, 2.0), (2, 3.2, 4.0), (5, 8.0, 10.0), (1000, 8.0, 10.0)])
def test_backoff_delay_doubles_with_jitter_and_stays_under_its_maximum(
        step: int, low: float, high: float) -> None:
    rng = random.Random(7)
    delays = [backoff_delay(1.0, 10.0, step, rng) for _ in range(200)]
    assert all(low <= d <= high for d in delays)
    assert max(delays) - min(delays) > (high - low) / 2  # jittered, not constant


@pytest.mark.parametrize("code, text, exit_code, sig, status", [
    (0, "exited with code 0", 0, None, 0),
    (3, "exited with code 3", 3, None, 3),
    (-9, "killed by SIGKILL", None, 9, 137),
    (-15, "killed by SIGTERM", None, 15, 143),
    (-99, "killed by signal 99", None, 99, 227),
])
def test_what_a_return_code_means_in_every_view(code: int, text: str, exit_code: int | None,
                                                 sig: int | None, status: int) -> None:
    assert describe_returncode(code) == text
    assert split_returncode(code) == (exit_code, sig)
    assert shell_status(code) == status
    proc = PluginProcess(Decision("all_x.sh", "/p/all_x.sh", True, "all", ["x"]))
    proc.machine.last_returncode = code
    entry = proc.status()
    assert entry["exit_code"] == exit_code
    assert entry["signal"] == ({9: "SIGKILL", 15: "SIGTERM"}.get(sig) if sig else None)


# ----------------------------------------------------------------------- starting, running
def test_starting_lasts_until_startsecs_then_running() -> None:
    m = machine(timeout=30)
    assert m.state == State.STOPPED
    assert m.start() == [Spawn()]
    assert m.state == State.STARTING
    assert m.spawned() == [Arm("up", STARTSECS), Arm("timeout", 30)]
    assert m.fired("up") == []
    assert m.state == State.RUNNING


def test_the_first_output_line_ends_starting_early() -> None:
    m = machine()
    m.start()
    m.spawned()
    assert m.output() == [Cancel("up")]
    assert m.state == State.RUNNING
    assert m.output() == []  # later lines change nothing


def test_starting_a_running_plugin_does_nothing() -> None:
    m = running(machine())
    assert m.start() == [] and m.start(operator=True) == []
    assert m.state == State.RUNNING


# ------------------------------------------------------------------------- restart policies
@pytest.mark.parametrize("restart, code, state", [
    ("never", 0, State.EXITED), ("never", 1, State.EXITED),
    ("on-failure", 0, State.EXITED), ("on-failure", 1, State.BACKOFF),
    ("always", 0, State.BACKOFF), ("always", -9, State.BACKOFF),
])
def test_restart_policy_after_a_run_ends(restart: str, code: int, state: State) -> None:
    m = running(machine(restart=restart))
    actions = m.ended(code)
    assert m.state == state
    assert m.last_failure == (code != 0)
    assert m.last_returncode == code
    if state == State.BACKOFF:
        assert any(isinstance(a, Arm) and a.timer == "backoff" for a in actions)
    else:
        assert messages(actions) == [describe_returncode(code)]


def test_an_exit_while_starting_follows_the_policy_too() -> None:
    m = machine(restart="never")
    m.start()
    m.spawned()
    assert m.ended(0) == [Cancel("up"), Log(logging.INFO, "exited with code 0")]
    assert m.state == State.EXITED


def test_max_restarts_then_failed() -> None:
    m = running(machine(restart="always", max_restarts=2))
    for expected in (1, 2):
        m.ended(1)
        assert m.state == State.BACKOFF
        assert m.fired("backoff") == [Spawn()]
        assert m.state == State.STARTING and m.restarts == expected
        m.spawned()
    actions = m.ended(1)
    assert m.state == State.FAILED
    assert messages(actions) == ["exited with code 1; giving up after 2 restarts"]
    assert actions[-1] == Log(logging.ERROR, "exited with code 1; giving up after 2 restarts")


def test_backoff_doubles_with_jitter_and_resets_after_a_long_run() -> None:
    clock = Clock()
    m = running(machine(clock, restart="always", max_restarts=0, backoff_initial=1.0,
                        backoff_max=8.0, backoff_reset=60.0))
    delays = []
    for _ in range(6):
        clock.now += 1.0  # short runs: the backoff keeps growing
        delays.append(backoff_of(m.ended(1)))
        clock.now += delays[-1]
        m.fired("backoff")
        m.spawned()
    for step, delay in enumerate(delays):
        base = min(8.0, 2.0 ** step)
        assert 0.8 * base <= delay <= base, (step, delays)
    clock.now += 60.0  # a run that lasted backoff.reset: the next delay is the first again
    assert 0.8 <= backoff_of(m.ended(1)) <= 1.0
    assert m.backoff_step == 1


def test_backoff_log_line_says_when_and_which_restart() -> None:
    m = running(machine(restart="on-failure", max_restarts=3, backoff_initial=2.0, seed=3))
    actions = m.ended(1)
    delay = backoff_of(actions)
    assert messages(actions) == [f"exited with code 1; restarting in {delay:.1f}s (restart 1 of 3)"]
    assert [a.level for a in actions if isinstance(a, Log)] == [logging.WARNING]


# ------------------------------------------------------------------------------- timeouts
def test_timeout_stops_the_run_and_counts_as_a_failure() -> None:
    clock = Clock()
    m = machine(clock, restart="on-failure", timeout=5, stop_timeout=2)
    m.start()
    m.spawned()
    m.output()
    clock.now += 5
    actions = m.fired("timeout")
    assert m.state == State.STOPPING
    assert actions == [Log(logging.WARNING, "timed out after 5s; stopping it"), Terminate(2)]
    actions = m.ended(-15)
    assert m.state == State.BACKOFF and m.last_failure
    assert messages(actions)[0].startswith("killed by SIGTERM (timed out after 5s); restarting")


def test_a_run_that_exits_0_after_its_timeout_is_still_a_failure() -> None:
    m = running(machine(restart="never", timeout=1))
    m.fired("timeout")
    m.ended(0)
    assert m.state == State.EXITED and m.last_failure


def test_the_timeout_timer_is_cancelled_when_the_run_ends_or_is_stopped() -> None:
    m = running(machine(restart="always", timeout=3600))
    assert Cancel("timeout") in m.ended(1)
    m.fired("backoff")
    m.spawned()
    assert Cancel("timeout") in m.stop()
    assert m.armed == set()


# ---------------------------------------------------------------------------------- stops
def test_stop_during_backoff_is_stopped_at_once() -> None:
    m = running(machine(restart="always"))
    m.ended(1)
    assert m.stop() == [Cancel("backoff")]
    assert m.state == State.STOPPED and m.armed == set()


def test_stop_during_starting_terminates_and_ends_stopped() -> None:
    m = machine(restart="always", stop_timeout=4)
    m.start()
    m.spawned()
    assert m.stop() == [Cancel("up"), Terminate(4)]
    assert m.state == State.STOPPING
    assert m.stop(0.5) == []  # already stopping
    m.ended(-15)
    assert m.state == State.STOPPED  # "always" does not restart a requested stop


def test_exit_by_itself_while_stopping_is_stopped() -> None:
    m = running(machine(restart="always"))
    m.stop(1.0)
    assert messages(m.ended(0)) == ["stopped (exited with code 0)"]
    assert m.state == State.STOPPED


def test_a_stop_while_timing_out_makes_the_end_a_stop() -> None:
    m = running(machine(restart="always", timeout=1, stop_timeout=10))
    m.fired("timeout")
    assert m.stop(0.5) == [Terminate(0.5)]  # the shorter grace applies
    m.ended(-15)
    assert m.state == State.STOPPED


def test_stop_of_an_ended_plugin_changes_nothing() -> None:
    m = running(machine())
    m.ended(0)
    assert m.stop() == [] and m.state == State.EXITED


# ------------------------------------------------------------------ replace (changed file)
@pytest.mark.parametrize("where", ["starting", "running"])
def test_replace_of_a_live_run_stops_it_then_renews(where: str) -> None:
    m = machine(restart="never", stop_timeout=3)
    m.start()
    m.spawned()
    if where == "running":
        m.output()
    actions = m.replace()
    assert m.state == State.STOPPING and actions[-1] == Terminate(3)
    actions = m.ended(-15)
    assert m.state == State.STOPPED
    assert actions[-2:] == [Log(logging.INFO, "killed by SIGTERM; restarting changed plugin"),
                            Renew()]


def test_replace_while_stopping_renews_once_the_run_is_over() -> None:
    m = running(machine(timeout=1))
    m.fired("timeout")
    assert m.replace() == []
    assert m.ended(-15)[-1] == Renew()


def test_replace_during_backoff_renews_at_once() -> None:
    m = running(machine(restart="always"))
    m.ended(1)
    assert m.replace() == [Cancel("backoff"), Renew()]
    assert m.state == State.STOPPED


@pytest.mark.parametrize("code, restart", [(0, "never"), (1, "on-failure")])
def test_replace_of_an_ended_plugin_renews(code: int, restart: str) -> None:
    m = running(machine(restart=restart, max_restarts=0 if code == 0 else 1))
    m.ended(code)
    if m.state == State.BACKOFF:
        m.fired("backoff")
        m.spawned()
        m.ended(code)
    assert m.state in (State.EXITED, State.FAILED)
    assert m.replace() == [Renew()]


def test_a_stop_cancels_a_pending_replace() -> None:
    m = running(machine())
    m.replace()
    m.stop()
    assert Renew() not in m.ended(-15)
    assert m.state == State.STOPPED


# ------------------------------------------------------------------ the operator's requests
def test_operator_hold_survives_reload_until_start() -> None:
    m = running(machine(restart="always"))
    m.stop(hold=True)
    m.ended(-15)
    assert m.state == State.STOPPED and m.held
    assert m.replace() == []  # a reload with a changed file does not start it
    assert m.state == State.STOPPED and m.held
    assert m.start(operator=True) == [Spawn()]
    assert m.state == State.STARTING and not m.held and m.restarts == 0


def test_operator_restart_counts_and_starts_after_the_stop() -> None:
    m = running(machine(restart="never", stop_timeout=2))
    assert m.restart() == [Terminate(2)]
    assert m.state == State.STOPPING
    actions = m.ended(-15)
    assert actions == [Log(logging.INFO, "killed by SIGTERM; restarting (operator request)"),
                       Spawn()]
    assert m.state == State.STARTING and m.restarts == 1


def test_operator_start_while_stopping_starts_when_over_without_counting() -> None:
    m = running(machine())
    m.stop(hold=True)
    assert m.start(operator=True) == []
    assert m.ended(-15)[-1] == Spawn()
    assert m.state == State.STARTING and m.restarts == 0 and not m.held


def test_operator_start_during_backoff_starts_now_with_a_fresh_backoff() -> None:
    m = running(machine(restart="always"))
    for _ in range(3):
        m.ended(1)
        m.fired("backoff")
        m.spawned()
    m.ended(1)
    assert m.backoff_step == 4
    assert m.start(operator=True) == [Cancel("backoff"), Spawn()]
    assert m.backoff_step == 0 and m.armed == set()


def test_operator_restart_of_a_failed_plugin_counts() -> None:
    m = running(machine(restart="always", max_restarts=1))
    m.ended(1)
    m.fired("backoff")
    m.spawned()
    m.ended(1)
    assert m.state == State.FAILED
    assert m.restart() == [Spawn()]
    assert m.restarts == 2


def test_a_plugin_that_cannot_run_fails_at_once() -> None:
    m = machine(restart="always")
    m.start()
    assert m.cannot_run("refused: mode 0666") == [Log(logging.ERROR,
                                                      "cannot run: refused: mode 0666")]
    assert m.state == State.FAILED and m.last_failure


def test_a_spawn_failure_is_a_failed_run_for_the_policy() -> None:
    m = machine(restart="on-failure", max_restarts=1)
    m.start()
    actions = m.spawn_failed("cannot start /bin/nope: ENOENT")
    assert m.state == State.BACKOFF
    assert actions[0].level == logging.ERROR  # type: ignore[union-attr]
    m.fired("backoff")
    m.spawn_failed("cannot start /bin/nope: ENOENT")
    assert m.state == State.FAILED


def test_a_spawn_failure_not_restarted_is_failed_not_exited() -> None:
    """README: ``failed`` means gave up (past max_restarts, or could not start)."""
    m = machine(restart="never")
    m.start()
    actions = m.spawn_failed("cannot start /etc/hostname: Exec format error")
    assert m.state == State.FAILED
    assert [a.message for a in actions if isinstance(a, Log)] == [
        "could not start (cannot start /etc/hostname: Exec format error); "
        "not restarted (restart: never)"]
    ended = running(machine(restart="never"))
    ended.ended(3)
    assert ended.state == State.EXITED  # a run that did start and ended stays `exited`


def test_a_thousand_restarts_in_milliseconds() -> None:
    clock = Clock()
    m = running(machine(clock, restart="always", max_restarts=1000, backoff_max=0.5))
    began = time.perf_counter()
    while m.state != State.FAILED:
        clock.now += 0.1
        m.ended(1)
        if m.state == State.BACKOFF:
            clock.now += 0.5
            m.fired("backoff")
            m.spawned()
    assert m.restarts == 1000
    assert time.perf_counter() - began < 0.5


# ------------------------------------------------------------------------- timers, groups
def test_cancelled_timers_never_fire_and_do_not_pile_up() -> None:
    heap = TimerHeap()
    fired: list[int] = []
    keep = heap.push(5.0, lambda: fired.append(5))
    for i in range(1000):  # a crash loop with a one-hour timeout, each cancelled by its run
        heap.push(3600.0 + i, lambda: fired.append(-1)).cancel()
        list(heap.due(0.0))
    assert len(heap) == 1 and len(heap._heap) <= 2
    early = heap.push(1.0, lambda: fired.append(1))
    early.cancel()
    assert heap.next_deadline() == 5.0
    assert list(heap.due(4.0)) == []
    for fn in heap.due(5.0):
        fn()
    assert fired == [5] and not heap
    keep.cancel()  # cancelling a timer that already fired is harmless
    assert len(heap) == 0


def test_group_ender_forgets_a_group_that_is_gone() -> None:
    ender = GroupEnder()
    ender.end(2 ** 22 + 12345, 5.0, now=100.0)  # no such group: nothing to signal
    assert ender.left(2 ** 22 + 12345, 101.0) == 4.0
    assert ender.check(101.0) == [2 ** 22 + 12345]
    assert not ender


# ------------------------------------------------------------- the supervisor executes them
def test_supervisor_logs_a_bad_transition_once_and_carries_on(caplog: Any) -> None:
    supervisor = Supervisor(sink=_NullSink(), environment=lambda d: {})
    try:
        decision = Decision("all_x.sh", "/p/all_x.sh", True, "all", None, error="refused")
        proc = supervisor._new_proc(decision, None)
        with caplog.at_level(logging.ERROR, logger="plugin_launcher.supervisor"):
            supervisor._feed(proc, proc.machine.start)  # no command: cannot run -> failed
            assert proc.state == State.FAILED and proc.error == "refused"
            for _ in range(3):
                supervisor._feed(proc, lambda: proc.machine.fired("backoff"))
        bad = [r for r in caplog.records if "no transition" in r.getMessage()]
        assert len(bad) == 1 and "from failed on restart" in bad[0].getMessage()
        assert proc.state == State.FAILED
    finally:
        supervisor.close()


class _NullSink:
    def write(self, name: str, stream: str, block: bytes, pid: int | None = None) -> None:
        pass
