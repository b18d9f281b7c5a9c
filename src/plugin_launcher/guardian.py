"""The guardian: a tiny process that ends every plugin group when the host dies, however it dies.

``atexit`` does not run on SIGKILL, on SIGTERM with Python's default handling, or on ``os._exit``,
so cleanup must live outside the host.  The host keeps the write end of a pipe to our stdin and
tells us each plugin's process group as it starts (``+ PGID STOP_TIMEOUT``) and ends (``- PGID``).
When the pipe reaches end-of-file, or the host's pidfd says it exited, we send SIGTERM to every
group, SIGKILL to those still alive after their stop timeout, and exit.

Runs as ``python -I -S guardian.py HOST_PID``: standard library only, imports nothing of the
package, in its own session, deaf to SIGINT/SIGHUP so a Ctrl-C to the terminal cannot kill it
before it has done its work.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

POLL = 0.05
GRACE_AFTER_KILL = 1.0


def live_groups(pgids: list[int]) -> set[int]:
    """The process groups among ``pgids`` that still have a member that is not a zombie.

    kill(-pgid, 0) alone also counts zombies, which an init that reaps slowly (or a parent that
    does not) can leave for seconds; those are dead for our purposes.  One pass over /proc serves
    every group at once.
    """
    candidates = set()
    for pgid in pgids:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        candidates.add(pgid)
    if not candidates:
        return candidates
    alive: set[int] = set()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return candidates
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[0] != b"Z":  # fields: state, ppid, pgrp, ...
            pgrp = int(fields[2])
            if pgrp in candidates:
                alive.add(pgrp)
    return alive


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class GroupEnder:
    """Ending process groups: SIGTERM now, SIGKILL after each group's grace, done once no live
    member is left (or, past SIGKILL, after ``GRACE_AFTER_KILL``: only zombies can remain).

    The one implementation of that rule: the guardian runs it in a blocking loop
    (``end_groups``), the supervisor calls ``check`` from its event loop.
    """

    def __init__(self) -> None:
        self.deadlines: dict[int, float] = {}  # pgid -> when to SIGKILL it
        self.killed: dict[int, float] = {}  # pgid -> when it was SIGKILLed

    def __contains__(self, pgid: int) -> bool:
        return pgid in self.deadlines

    def __len__(self) -> int:
        return len(self.deadlines)

    def end(self, pgid: int, grace: float, now: float) -> None:
        """SIGTERM group ``pgid`` now; SIGKILL it at ``now + grace`` (the earliest deadline
        wins when it is being ended already)."""
        signal_group(pgid, signal.SIGTERM)
        if pgid not in self.killed:
            self.deadlines[pgid] = min(self.deadlines.get(pgid, now + grace), now + grace)

    def left(self, pgid: int, now: float) -> float | None:
        """Seconds until group ``pgid`` is SIGKILLed; None once it has been."""
        return None if pgid in self.killed else max(0.0, self.deadlines[pgid] - now)

    def kill_all(self) -> None:
        for pgid in self.deadlines:
            signal_group(pgid, signal.SIGKILL)

    def check(self, now: float) -> list[int]:
        """SIGKILL the groups past their deadline; forget and return those that are over."""
        alive = live_groups(list(self.deadlines))
        over = []
        for pgid, deadline in list(self.deadlines.items()):
            killed_at = self.killed.get(pgid)
            if pgid in alive and killed_at is None and now >= deadline:
                signal_group(pgid, signal.SIGKILL)
                self.killed[pgid] = now
            elif pgid not in alive or (killed_at is not None
                                       and now - killed_at > GRACE_AFTER_KILL):
                del self.deadlines[pgid]
                self.killed.pop(pgid, None)
                over.append(pgid)
        return over


def end_groups(groups: dict[int, float]) -> None:
    """SIGTERM every group at once, SIGKILL each one still alive after its own timeout."""
    ender = GroupEnder()
    start = time.monotonic()
    for pgid, timeout in groups.items():
        ender.end(pgid, timeout, start)
    while ender:
        ender.check(time.monotonic())
        if ender:
            time.sleep(POLL)


def main(argv: list[str]) -> int:
    host_pid = int(argv[1]) if len(argv) > 1 else os.getppid()
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    # SIGTERM to the guardian itself (say, a service manager stopping everything): clean up now.
    signal.signal(signal.SIGTERM, lambda *_: None)
    fds = [0]
    try:
        fds.append(os.pidfd_open(host_pid))
    except (AttributeError, OSError):
        pass  # no pidfd: the pipe's end-of-file alone tells us
    groups: dict[int, float] = {}
    buffer = b""
    signal.set_wakeup_fd(-1)
    r_sig, w_sig = os.pipe()
    os.set_blocking(w_sig, False)
    signal.set_wakeup_fd(w_sig)
    fds.append(r_sig)
    host_gone = False
    while not host_gone:
        try:
            ready, _, _ = select.select(fds, [], [])
        except InterruptedError:
            continue
        if 0 in ready:
            data = os.read(0, 65536)
            if not data:
                break
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                words = line.split()
                if len(words) == 3 and words[0] == b"+":
                    groups[int(words[1])] = float(words[2])
                elif len(words) == 2 and words[0] == b"-":
                    groups.pop(int(words[1]), None)
        host_gone = any(fd in ready for fd in fds[1:])
    end_groups(groups)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
