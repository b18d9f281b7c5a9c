"""The guardian: a tiny process that ends every plugin group when the host dies, however it dies.

``atexit`` does not run on SIGKILL, on SIGTERM with Python's default handling, or on ``os._exit``,
so cleanup must live outside the host.  The host keeps the write end of a pipe to our stdin and
tells us each plugin's process group as it starts (``+ PGID STOP_TIMEOUT``) and ends (``- PGID``).
When the pipe reaches end-of-file, or the host's pidfd says it exited, we send SIGTERM to every
group, SIGKILL to those still alive after their stop timeout, and exit.

Runs as ``python -I -S guardian.py HOST_PID [CGROUP_DIR]...`` (in effect; see ``command``):
standard library only (and its sibling ``cgroups.py``), in its own session, deaf to SIGINT/SIGHUP
so a Ctrl-C to the terminal cannot kill it before it has done its work. Ending a group also ends
the rest of that plugin (its session's strays; its cgroup), and at the end every cgroup under the
CGROUP_DIRs (the launcher's) is killed and removed, so a plugin the host had not told us about yet
is not missed.

SIGTERM ends a guardian *without* ending plugins (the host starts a new one and tells it every
live group).  A guardian starts a **watchman** (this file with ``--watchman``), which reads a
copy of every line and acts only when its guardian's pipe ends while the host is dead too: the
host and the guardian SIGKILLed at once.
"""

from __future__ import annotations

import os
import select
import sys
import time

TYPE_CHECKING = False  # typing itself costs a guardian 10 ms to import

if TYPE_CHECKING:
    import signal
else:
    try:  # the C module that ``signal`` wraps in enums: a guardian starts without enum & co
        import _signal as signal
    except ImportError:
        import signal

try:
    from . import cgroups
except ImportError:  # run as a script (python -I -S guardian.py): load the sibling file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import cgroups  # type: ignore[no-redef,import-not-found,unused-ignore]

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
    if not candidates:  # the group is empty; its session or cgroup may not be (containment)
        return cgroups.live_cages(set(pgids))
    if not os.path.isdir("/proc"):
        return candidates
    alive = {pgrp for _pid, state, pgrp, _sid in cgroups.proc_table()
             if state != b"Z" and pgrp in candidates}
    return alive | cgroups.live_cages(set(pgids) - alive)


def signal_group(pgid: int, sig: int) -> None:
    """``sig`` to group ``pgid`` and to the rest of its plugin: members of its session that
    changed group, and members of its cgroup (cgroups.py)."""
    signal_groups([pgid], sig)


def signal_groups(pgids: list[int], sig: int) -> None:
    """``signal_group`` for many groups at once (one scan of /proc for all of them)."""
    for pgid in pgids:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    cgroups.signal_cages(pgids, sig)


class GroupEnder:
    """Ending process groups: SIGTERM now, SIGKILL after each group's grace, done once no live
    member is left (or, past SIGKILL, after ``GRACE_AFTER_KILL``: only zombies can remain).

    The one implementation of that rule: the guardian runs it in a blocking loop
    (``end_groups``), the supervisor calls ``check`` from its event loop.
    """

    def __init__(self) -> None:
        self.deadlines: dict[int, float] = {}  # pgid -> when to SIGKILL it
        self.killed: dict[int, float] = {}  # pgid -> when it was SIGKILLed
        self._held: list[int] | None = None  # SIGTERMs collected between hold() and release()

    def __contains__(self, pgid: int) -> bool:
        return pgid in self.deadlines

    def __len__(self) -> int:
        return len(self.deadlines)

    def hold(self) -> None:
        """Collect the SIGTERMs of ``end`` until ``release``, which sends them together: a
        stop of many groups then scans /proc once, not once per group."""
        self._held = []

    def release(self) -> None:
        held, self._held = self._held, None
        if held:
            signal_groups(held, signal.SIGTERM)

    def end(self, pgid: int, grace: float, now: float) -> None:
        """SIGTERM group ``pgid`` now (or at ``release``); SIGKILL it at ``now + grace`` (the
        earliest deadline wins when it is being ended already)."""
        if self._held is not None:
            self._held.append(pgid)
        else:
            signal_group(pgid, signal.SIGTERM)
        if pgid not in self.killed:
            self.deadlines[pgid] = min(self.deadlines.get(pgid, now + grace), now + grace)

    def left(self, pgid: int, now: float) -> float | None:
        """Seconds until group ``pgid`` is SIGKILLed; None once it has been."""
        return None if pgid in self.killed else max(0.0, self.deadlines[pgid] - now)

    def kill_all(self) -> None:
        signal_groups(list(self.deadlines), signal.SIGKILL)

    def check(self, now: float) -> list[int]:
        """SIGKILL the groups past their deadline; forget and return those that are over."""
        alive = live_groups(list(self.deadlines))
        over, kill = [], []
        for pgid, deadline in list(self.deadlines.items()):
            killed_at = self.killed.get(pgid)
            if pgid in alive and killed_at is None and now >= deadline:
                kill.append(pgid)
                self.killed[pgid] = now
            elif pgid not in alive or (killed_at is not None
                                       and now - killed_at > GRACE_AFTER_KILL):
                del self.deadlines[pgid]
                self.killed.pop(pgid, None)
                over.append(pgid)
        if kill:
            signal_groups(kill, signal.SIGKILL)
        return over


def end_groups(groups: dict[int, float]) -> None:
    """SIGTERM every group at once, SIGKILL each one still alive after its own timeout."""
    ender = GroupEnder()
    start = time.monotonic()
    ender.hold()
    for pgid, timeout in groups.items():
        ender.end(pgid, timeout, start)
    ender.release()
    while ender:
        ender.check(time.monotonic())
        if ender:
            time.sleep(POLL)


WATCHMAN = "--watchman"
RESCUE_WAIT = 1.0  # watchman: how long a host that may be dying together with the guardian has
# How a guardian is started: ``python -I -S -c BOOT .../guardian.py HOST_PID ...``.  A script
# run by path is compiled anew at every start; imported, it comes from its byte-code cache.
BOOT = ("import os, sys; sys.path.insert(0, os.path.dirname(sys.argv[1])); import guardian; "
        "sys.exit(guardian.main(sys.argv[1:]))")


def command(*args: str) -> list[str]:
    """The argv that starts a guardian (or, with ``WATCHMAN`` among ``args``, a watchman)."""
    return [sys.executable or "python3", "-I", "-S", "-c", BOOT, os.path.abspath(__file__),
            *args]


def parse_args(argv: list[str]) -> tuple[int, bool, list[str]]:
    """``guardian.py HOST_PID [--watchman] [CGROUP_DIR]...`` -> (host, watchman?, cgroup dirs)."""
    host_pid = int(argv[1]) if len(argv) > 1 else os.getppid()
    rest = argv[2:]
    return host_pid, WATCHMAN in rest, [a for a in rest if a != WATCHMAN]


Helper = tuple[int, int, "int | None"]  # a running watchman: (pid, write fd, pidfd)


def start_watchman(argv: list[str]) -> Helper | None:
    """Our own watchman: a second guardian that gets every line we get and acts only if we die
    and the host is dead too (host and guardian SIGKILLed at once).  ``posix_spawn`` rather
    than ``subprocess``: importing it would double a guardian's start-up time, which is paid
    while the host launches its plugins."""
    read_end, write_end = os.pipe()  # both close-on-exec; dup2 makes stdin inheritable
    try:
        cmd = command(*argv[1:], WATCHMAN)
        pid = os.posix_spawn(
            cmd[0], cmd, os.environ,
            file_actions=[(os.POSIX_SPAWN_DUP2, read_end, 0),
                          (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])
    except OSError:
        os.close(write_end)
        return None
    finally:
        os.close(read_end)
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    return pid, write_end, pidfd


def _host_dead(host_fd: int | None, host_pid: int, wait: float) -> bool:
    if host_fd is not None:
        return bool(select.select([host_fd], [], [], wait)[0])
    deadline = time.monotonic() + wait
    while True:
        try:
            os.kill(host_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)


def main(argv: list[str]) -> int:
    host_pid, watchman, roots = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    # SIGTERM (default action) ends a guardian without ending plugins: only the host's end makes
    # a guardian end them.  The host sees our pidfd and starts a new guardian at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        host_fd: int | None = os.pidfd_open(host_pid)
    except (AttributeError, OSError):
        host_fd = None  # no pidfd (or the host is gone already): the pipe's end-of-file tells us
    helper = None if watchman else start_watchman(argv)
    started = time.monotonic()
    groups: dict[int, float] = {}
    buffer = b""
    host_gone = False
    while not host_gone:
        # a watchman waits for its guardian's end-of-file only, never acting beside it
        fds = [0, *([host_fd] if host_fd is not None and not watchman else [])]
        if helper is not None and helper[2] is not None:
            fds.append(helper[2])
        try:
            ready, _, _ = select.select(fds, [], [])
        except InterruptedError:
            continue
        data = os.read(0, 65536) if 0 in ready else None
        if data is not None and helper is not None:
            try:
                os.write(helper[1], data)
            except OSError:
                pass  # it died: restarted below once its pidfd says so
        if data == b"":
            if watchman:  # our guardian ended: act only if the host is dead (or dying) too
                if not _host_dead(host_fd, host_pid, RESCUE_WAIT):
                    return 0
            break
        if data:
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                words = line.split()
                if len(words) == 3 and words[0] == b"+":
                    groups[int(words[1])] = float(words[2])
                elif len(words) == 2 and words[0] == b"-":
                    groups.pop(int(words[1]), None)
                elif words == [b"bye"] and watchman:
                    return 0  # our guardian finished its work: nothing for us to do
        host_gone = host_fd is not None and host_fd in ready and not watchman
        if helper is not None and helper[2] is not None and helper[2] in ready:
            helper = _replace_watchman(helper, argv, groups, started)
            started = time.monotonic()
    end_groups(groups)
    for root in roots:
        cgroups.sweep(root)
    if helper is not None:
        try:
            os.write(helper[1], b"bye\n")
        except OSError:
            pass
    return 0


def _replace_watchman(helper: Helper, argv: list[str], groups: dict[int, float],
                      last_start: float) -> Helper | None:
    """Our watchman died: reap it and start another that knows every group (at most one
    restart per second: a watchman that cannot run is given up)."""
    pid, fd, pidfd = helper
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    for owned in (fd, pidfd):
        if owned is not None:
            os.close(owned)
    if time.monotonic() - last_start < 1.0:
        return None
    new = start_watchman(argv)
    if new is not None:
        replay = "".join(f"+ {pgid} {timeout}\n" for pgid, timeout in groups.items())
        try:
            os.write(new[1], replay.encode())
        except OSError:
            pass
    return new


if __name__ == "__main__":
    sys.exit(main(sys.argv))
