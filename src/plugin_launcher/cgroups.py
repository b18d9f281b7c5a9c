"""Finding and ending every process of a plugin: its session, its cgroup.  Standard library only.

The guardian imports this file as a sibling script (``python -I -S guardian.py`` has no package),
so it imports nothing of the package.  Two ways to find a plugin's processes besides its process
group:

- the session ID (field 6 of ``/proc/PID/stat``): every plugin leads its own session, so children
  that move to another process group (``set -m`` jobs, ``setpgid``) are still found;
- a cgroup per run, where the machine lets us write one (cgroup v2 with ``cgroup.kill``, or a v1
  ``freezer``/``pids``/named hierarchy): nothing a plugin does without privileges leaves it, so
  double-fork + ``setsid`` daemons are found too.  The child joins its cgroup before the plugin
  runs, and if the cgroup is gone by then (the host died and the guardian removed it), the child
  exits instead: there is no instant at which a plugin process exists outside every mechanism.
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False  # typing itself costs a guardian 10 ms to import

if TYPE_CHECKING:
    import signal
    from collections.abc import Iterator
    from typing import Any
else:
    try:  # as in guardian.py: no enum import in a guardian
        import _signal as signal
    except ImportError:
        import signal

CGROUP_ROOT = "/sys/fs/cgroup"
BASE_NAME = "plugin-launcher"
KILL_ROUNDS_WAIT = 0.01

# pgid (the plugin's session ID too) -> the cgroup folders of that run (host side only)
_CAGES: dict[int, tuple[str, ...]] = {}
_OOM_KILLED: set[int] = set()  # runs whose cgroups saw an OOM kill before they were removed


# ---------------------------------------------------------------------------- /proc and sessions
def proc_table() -> Iterator[tuple[int, bytes, int, int]]:
    """(pid, state, pgrp, session) of every process we can see."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            yield int(entry), fields[0], int(fields[2]), int(fields[3])
        except (OSError, IndexError, ValueError):
            continue


SNAPSHOT_AGE = 0.005  # seconds a /proc table serves liveness checks: about one scan's time
_snapshot: list[Any] = [float("-inf"), []]  # (taken at, table)


def proc_snapshot() -> list[tuple[int, bytes, int, int]]:
    """``proc_table()`` taken at most ``SNAPSHOT_AGE`` ago, for liveness checks: when many
    runs end together (a stop of 100 plugins), their checks share a scan instead of each
    paying one (what a fresh scan could see that this one misses is no more than what changes
    while a scan runs)."""
    now = time.monotonic()
    if now - _snapshot[0] > SNAPSHOT_AGE:
        table = list(proc_table())
        _snapshot[:] = [time.monotonic(), table]
    table_now: list[tuple[int, bytes, int, int]] = _snapshot[1]
    return table_now


def session_strays(sids: set[int], fresh: bool = False) -> dict[int, list[int]]:
    """Live processes in sessions ``sids`` that left the session's own process group
    (``fresh``: from a new scan of /proc, as signalling needs; else a recent snapshot)."""
    found: dict[int, list[int]] = {}
    if sids:
        for pid, state, pgrp, sid in proc_table() if fresh else proc_snapshot():
            if sid in sids and pgrp != sid and state != b"Z":
                found.setdefault(sid, []).append(pid)
    return found


def _pgrp(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


# ----------------------------------------------------------------------------------- cgroups
def is_v2(path: str) -> bool:
    return os.path.exists(os.path.join(path, "cgroup.kill")) or not os.path.exists(
        os.path.join(path, "tasks"))


def members(path: str) -> list[int]:
    """PIDs in cgroup ``path`` (and its children, which we never create but a plugin could not
    either without privileges); empty if the folder is gone."""
    pids: list[int] = []
    for folder, _dirs, _files in os.walk(path):
        try:
            with open(os.path.join(folder, "cgroup.procs")) as f:
                pids.extend(int(x) for x in f.read().split())
        except (OSError, ValueError):
            continue
    return pids


def live_members(path: str) -> list[int]:
    """Members that are not zombies (a zombie has died; its parent just has not reaped it)."""
    alive = []
    for pid in members(path):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] != b"Z":
                    alive.append(pid)
        except (OSError, IndexError):
            continue
    return alive


def _write(path: str, text: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(text)
        return True
    except OSError:
        return False


def kill_cgroup(path: str, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to every process of cgroup ``path``.  SIGKILL is atomic where the kernel
    allows: v2 ``cgroup.kill``; v1 freezer: freeze, kill, thaw (no fork can slip through)."""
    if sig == signal.SIGKILL:
        if _write(os.path.join(path, "cgroup.kill"), "1"):
            return
        state = os.path.join(path, "freezer.state")
        if os.path.exists(state) and _write(state, "FROZEN"):
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                try:
                    with open(state) as f:
                        if f.read().strip() == "FROZEN":
                            break
                except OSError:
                    break
                time.sleep(KILL_ROUNDS_WAIT)
            signal_pids(members(path), sig)
            _write(state, "THAWED")
            return
    signal_pids(members(path), sig)


def remove(path: str) -> bool:
    """rmdir the cgroup (children first); True once it is gone."""
    try:
        os.rmdir(path)  # the common case: a run's cgroup has no child cgroups
        return True
    except FileNotFoundError:
        return True
    except OSError:
        pass
    for folder, dirs, _files in os.walk(path, topdown=False):
        for name in dirs:
            try:
                os.rmdir(os.path.join(folder, name))
            except OSError:
                pass
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def sweep(path: str, timeout: float = 2.0) -> bool:
    """Kill everything under ``path`` and remove it, retrying until it is gone: a child that
    joins a run's cgroup after a kill keeps the folder busy and is killed on the next round, and
    once the folder is gone no child can join (its prologue exits).  True once gone."""
    deadline = time.monotonic() + timeout
    while True:
        for folder, _dirs, _files in os.walk(path, topdown=False):
            kill_cgroup(folder)
        if remove(path):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(KILL_ROUNDS_WAIT)


def signal_tree(path: str, sig: int) -> None:
    for folder, _dirs, _files in os.walk(path):
        signal_pids(members(folder), sig)


# ------------------------------------------------------------- the host's runs and their cages
def oom_kills(path: str) -> int:
    """Processes the kernel's OOM killer ended in cgroup ``path`` because of its memory limit
    (v2 ``memory.events``, v1 ``memory.oom_control``; 0 where neither says)."""
    for name in ("memory.events", "memory.oom_control"):
        try:
            with open(os.path.join(path, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return 0


def register(pgid: int, paths: tuple[str, ...]) -> None:
    if paths:
        _CAGES[pgid] = paths


def cages_of(pgid: int) -> tuple[str, ...]:
    return _CAGES.get(pgid, ())


def release(pgid: int) -> None:
    """The run is over: remove its cgroups and forget them (kept while one is still busy).
    An OOM kill they saw is remembered for ``oom_killed`` (their files go with them)."""
    paths = _CAGES.get(pgid, ())
    if paths and sum(oom_kills(path) for path in paths):
        _OOM_KILLED.add(pgid)
    if paths and all([remove(path) for path in paths]):
        del _CAGES[pgid]


def oom_killed(pgid: int) -> bool:
    """Whether the kernel's OOM killer ended a process of run ``pgid`` in its memory cgroup
    (asked once, when the run is over)."""
    if pgid in _OOM_KILLED:
        _OOM_KILLED.discard(pgid)
        return True
    return any(oom_kills(path) for path in _CAGES.get(pgid, ()))


# ------------------------------------------------------------- what the process-group code calls
def signal_cages(pgids: list[int], sig: int) -> None:
    """``sig`` to every process of runs ``pgids`` outside their process groups: cgroup
    members where a cgroup holds the run, else session members (any group).  One pass over
    /proc serves every run without a cgroup: ending 200 of them is one scan, not 200."""
    rest = set()
    for pgid in pgids:
        cages = cages_of(pgid)
        if not cages:
            rest.add(pgid)
        elif sig == signal.SIGKILL:
            for path in cages:
                kill_cgroup(path, sig)
        else:  # killpg reached the group: one signal each (a second could rerun a trap)
            found = {p for path in cages for p in members(path)}
            signal_pids([p for p in sorted(found) if _pgrp(p) != pgid], sig)
    for pids in session_strays(rest, fresh=True).values():
        signal_pids(pids, sig)


def live_cages(pgids: set[int]) -> set[int]:
    """The runs among ``pgids`` with a live process outside their process group."""
    alive = {pgid for pgid in pgids if any(live_members(p) for p in cages_of(pgid))}
    rest = {pgid for pgid in pgids if not cages_of(pgid)}
    alive.update(session_strays(rest))
    for pgid in pgids - alive:
        release(pgid)  # over: its (empty) cgroups go now, not at the launcher's stop
    return alive
