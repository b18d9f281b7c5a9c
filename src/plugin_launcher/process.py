"""One supervised plugin: its policy state machine, its current run and how a run is spawned.

A ``PluginProcess`` owns no thread; the supervisor's loop feeds its ``PluginMachine`` (machine.py)
events and carries out the actions it returns.  What happens after a run ends is decided in one
pure function, ``after_exit``, so the restart policy, ``max_restarts`` and the status view can
never disagree.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from . import cgroups
from .containment import Containment, check_executable
from .machine import (
    ACTIVE_STATES,
    Outcome,
    PluginMachine,
    State,
    after_exit,
    backoff_delay,
    describe_returncode,
    signal_name,
    split_returncode,
)
from .notify import Readiness
from .output import LineSplitter, safe_logger
from .plan import Decision
from .timers import Timer

log = safe_logger("plugin_launcher.process")  # names escaped


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
    limit_hit: str | None = None
    cages: tuple[str, ...] = ()  # its cgroups (containment.py), empty without cgroups

    @property
    def pgid(self) -> int:
        return self.pid  # start_new_session=True: the plugin leads its own group


@dataclass
class PluginProcess:
    decision: Decision
    machine: PluginMachine = None  # type: ignore[assignment]  # set in __post_init__
    run: Run | None = None
    started_wall: float | None = None
    output_lines: int = 0
    error: str | None = None
    change: str | None = None  # live reload: added / changed / removed
    signature: tuple[Any, ...] | None = None
    timers: dict[str, Timer] = field(default_factory=dict)  # the machine's armed timers
    readiness: Readiness = field(default_factory=Readiness)  # what it said over sd_notify

    def __post_init__(self) -> None:
        if self.machine is None:
            self.machine = PluginMachine(self.decision.options, time.monotonic)

    def retarget(self, decision: Decision, change: str | None) -> None:
        """Run ``decision`` (a changed file, new options) from the next start on."""
        self.decision, self.change = decision, change
        self.machine.options = decision.options

    # the policy's view, read-only: every change goes through the machine's transitions
    @property
    def state(self) -> State:
        return self.machine.state

    @property
    def restarts(self) -> int:
        return self.machine.restarts

    @property
    def held(self) -> bool:
        return self.machine.held

    @property
    def last_returncode(self) -> int | None:
        return self.machine.last_returncode

    @property
    def last_failure(self) -> bool:
        return self.machine.last_failure

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
        exit_code, number = split_returncode(code) if code is not None else (None, None)
        return {
            "name": self.name,
            "path": self.path,
            "pid": self.pid,
            "state": str(self.state),
            "restarts": self.restarts,
            "returncode": code,
            "exit_code": exit_code,
            "signal": signal_name(number) if number is not None else None,
            "started_at": self.started_wall,
            "output_lines": self.output_lines,
            "error": self.error,
            "change": self.change,
            **self.readiness.view(self.machine.clock()),
            # without ready: notify, a plugin is ready while it runs (as a Kubernetes probe)
            "ready": self.readiness.ready or (self.decision.options.ready is None
                                              and self.state == State.RUNNING),
            "ready_mode": self.decision.options.ready,
            "ended_by": self.machine.ended_by,  # not ready in time, missed watchdog
            "scope": self.decision.options.scope,
        }


_default_containment: Containment | None = None


def renice(pid: int, increment: int, name: str) -> None:
    """``nice -n increment`` for process ``pid`` (the host's niceness plus ``increment``,
    within -20..19); like ``nice``, a refused change (raising priority needs privileges) is
    one warning and the plugin runs at the host's niceness."""
    target = max(-20, min(19, os.getpriority(os.PRIO_PROCESS, 0) + increment))
    try:
        os.setpriority(os.PRIO_PROCESS, pid, target)
    except OSError as exc:
        log.warning("plugin %s: cannot set nice %d (%s); it runs at nice %d", name, target,
                    exc.strerror or exc, os.getpriority(os.PRIO_PROCESS, 0))


def spawn(decision: Decision, env: dict[str, str], containment: Containment | None = None,
          announce: Callable[[int], None] | None = None) -> Run:
    """Start one run: own session and process group, stdin from /dev/null, no inherited fds,
    contained and limited by an exec'd prologue (containment.py): no preexec_fn, no fork() of
    the host, so the cost does not grow with the host's memory.

    ``announce(pid)`` tells the guardian.  Without cgroups the plugin waits for it: its prologue
    reads one line from a pipe that is written only after ``announce`` returned (and reaches
    end-of-file if the host dies first), so no plugin ever runs unknown to the guardian.  The
    same gate holds a plugin with ``nice`` until the host has set it on the waiting process:
    nothing of the plugin ever runs at the host's priority."""
    global _default_containment
    assert decision.command is not None
    if containment is None:
        if _default_containment is None:
            _default_containment = Containment.detect("session")
        containment = _default_containment
    check_executable(decision.command[0], env)
    options = decision.options
    cages = containment.prepare(options, decision.name)  # before the spawn (no window)
    gated = containment.uses_prologue and (not cages or options.nice is not None)
    gate_r, gate_w = os.pipe() if gated else (subprocess.DEVNULL, None)
    try:
        popen = subprocess.Popen(
            containment.command(decision.command, options, cages, os.getpid(),
                                gate=gate_w is not None),
            stdin=gate_r,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    except BaseException:
        for path in cages:
            cgroups.remove(path)
        if gate_w is not None:
            os.close(gate_w)
        raise
    finally:
        if gate_w is not None:
            os.close(gate_r)
    cgroups.register(popen.pid, cages)
    try:
        if options.nice is not None:
            renice(popen.pid, options.nice, decision.name)
        if announce is not None:
            announce(popen.pid)
    finally:
        if gate_w is not None:
            try:
                os.write(gate_w, b"go\n")
            except OSError:
                pass  # it died already
            os.close(gate_w)
    run = Run(popen, popen.pid, time.monotonic(), time.time(), cages=cages)
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


__all__ = ["ACTIVE_STATES", "Outcome", "PluginProcess", "Run", "State", "after_exit",
           "backoff_delay", "describe_returncode", "spawn"]
