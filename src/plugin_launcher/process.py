"""One supervised plugin: its state machine, its current run and how a run is spawned.

A ``PluginProcess`` owns no thread; the supervisor's loop feeds it events.  What happens after a
run ends is decided in one pure function, ``after_exit``, so the restart policy, ``max_restarts``
and the status view can never disagree.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import IO, Any

from . import limits
from .output import LineSplitter
from .plan import Decision


class State(str, Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    EXITED = "exited"
    FAILED = "failed"
    STOPPED = "stopped"

    def __str__(self) -> str:
        return self.value


ACTIVE_STATES = frozenset({State.STARTING, State.RUNNING, State.BACKOFF, State.STOPPING})


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


def describe_returncode(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exited with code {code}"


@dataclass
class Run:
    """One start of a plugin: its process, pipes and what happened to it."""

    popen: subprocess.Popen[bytes]
    pid: int
    started: float  # monotonic
    started_wall: float
    pidfd: int | None = None
    open_fds: dict[int, str] = field(default_factory=dict)  # fd -> "stdout" | "stderr"
    pipes: dict[int, IO[bytes]] = field(default_factory=dict)  # fd -> its file object
    splitters: dict[int, LineSplitter] = field(default_factory=dict)
    returncode: int | None = None
    stop_requested: bool = False
    timed_out: bool = False
    limit_hit: str | None = None

    @property
    def pgid(self) -> int:
        return self.pid  # start_new_session=True: the plugin leads its own group


@dataclass
class PluginProcess:
    decision: Decision
    state: State = State.STARTING
    run: Run | None = None
    restarts: int = 0
    backoff_step: int = 0
    last_returncode: int | None = None
    last_failure: bool = False
    started_wall: float | None = None
    output_lines: int = 0
    error: str | None = None
    change: str | None = None  # live reload: added / changed / removed
    signature: tuple[Any, ...] | None = None
    held: bool = False  # stopped by the operator: no restart, no reload starts it until start

    @property
    def name(self) -> str:
        return self.decision.name

    @property
    def path(self) -> str:
        return self.decision.path

    @property
    def pid(self) -> int | None:
        return self.run.pid if self.run is not None else None

    @property
    def returncode(self) -> int | None:
        return self.run.returncode if self.run is not None else None

    @property
    def running(self) -> bool:
        return self.run is not None and self.run.returncode is None

    def status(self) -> dict[str, Any]:
        code = self.last_returncode
        return {
            "name": self.name,
            "path": self.path,
            "pid": self.pid,
            "state": str(self.state),
            "restarts": self.restarts,
            "returncode": code,
            "exit_code": code if code is not None and code >= 0 else None,
            "signal": signal.Signals(-code).name if code is not None and code < 0 and
            -code in signal.Signals._value2member_map_ else None,
            "started_at": self.started_wall,
            "output_lines": self.output_lines,
            "error": self.error,
            "change": self.change,
        }


def spawn(decision: Decision, env: dict[str, str]) -> Run:
    """Start one run: own session and process group, stdin from /dev/null, no inherited fds."""
    assert decision.command is not None
    popen = subprocess.Popen(
        decision.command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
        close_fds=True,
        preexec_fn=limits.preexec_for(decision.options),
    )
    run = Run(popen, popen.pid, time.monotonic(), time.time())
    for stream, pipe in (("stdout", popen.stdout), ("stderr", popen.stderr)):
        assert pipe is not None
        fd = pipe.fileno()
        os.set_blocking(fd, False)
        run.open_fds[fd] = stream
        run.pipes[fd] = pipe
        run.splitters[fd] = LineSplitter()
    try:
        run.pidfd = os.pidfd_open(popen.pid)
    except (AttributeError, OSError):
        run.pidfd = None  # the supervisor falls back to a timed poll for this run
    return run
