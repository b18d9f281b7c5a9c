"""Soak: 200 plugins for SOAK_SECONDS (default 20) in one launcher, then look for leaks.

A third of the plugins crash at once and are restarted forever (restart: on-failure, backoff 0.1 s
doubling to 1 s, max_restarts 0), a third flood numbered lines in rounds then sleep, a third idle.
The launcher runs in a separate host process (``PluginLauncher`` + a counting sink, driven over a
pipe) so its open file descriptors, threads and RSS are measured from outside with psutil:

* before launch, once launch has settled, at the end of the soak and after ``stop_plugins``;
* during the soak they must stay near the settled figures, and after ``stop_plugins`` the fds and
  threads are back to where they were before launch, RSS within +30 MB;
* every flooded line arrives once and in order, every crash run's line is counted;
* no process of any plugin run (restarted ones included: each run records its PID, and the host
  collects PIDs from ``status()`` all along) is left after ``stop_plugins``, nor anything in their
  process groups.

The figures are printed (even without ``-s``) for benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import PYTHON, ProcessTracker, alive, safe_dir, wait_for

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "20"))
PLUGINS = 200
CRASHERS, FLOODERS = 67, 67
IDLERS = PLUGINS - CRASHERS - FLOODERS
LINES_PER_ROUND = 2000
ROUNDS = max(1, int(SOAK_SECONDS // 2))  # one round a second: flooding ends halfway through
FLOOD_LINES = ROUNDS * LINES_PER_ROUND
MB = 1 << 20
RSS_BOUND = 30 * MB
FD_SLACK = 2

HOST = textwrap.dedent("""
    import faulthandler, json, logging, os, signal, sys, threading
    from plugin_launcher import PluginLauncher

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for stacks on a hang

    class CountingSink:
        '''Counts lines per plugin; checks that flooded lines arrive once and in order.'''
        def __init__(self):
            self.counts, self.last, self.disorder = {}, {}, {}
        def write(self, name, stream, block, pid=None):
            lines = block.split(b"\\n")[:-1]
            self.counts[name] = self.counts.get(name, 0) + len(lines)
            if name.startswith("all_flood"):
                last = self.last.get(name, 0)
                for line in lines:
                    n = int(line)
                    if n != last + 1:
                        self.disorder[name] = self.disorder.get(name, 0) + 1
                    last = n
                self.last[name] = last

    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    folder = sys.argv[1]
    config = {"plugin_locations": [folder], "plugin_options": {"default": {
        "restart": "on-failure", "max_restarts": 0, "backoff": {"initial": 0.1, "max": 1},
        "stop_timeout": 1}}}
    sink = CountingSink()
    KEYS = ("name", "pid", "state", "restarts", "output_lines")  # what the test reads
    launcher = PluginLauncher(config, "worker", worker_id=0, worker_count=1, sink=sink)
    seen = set()

    def reply(value):
        # os.write until done: on this kernel a blocking pipe write can return short while
        # another thread spawns processes, and Python's buffered stdout then drops the rest
        view = memoryview((json.dumps(value) + "\\n").encode())
        while view:
            view = view[os.write(1, view):]

    reply({"ready": os.getpid()})
    for command in sys.stdin:
        command = command.strip()
        if command == "launch":
            launcher.launch_plugins()
            reply({"launched": len(launcher.plugins)})
        elif command == "status":
            status = [{key: s[key] for key in KEYS} for s in launcher.status()]
            seen.update(s["pid"] for s in status if s["pid"])
            reply({"status": status, "counts": dict(sink.counts),
                   "disorder": dict(sink.disorder), "seen": sorted(seen)})
        elif command == "stop":
            launcher.stop_plugins()
            reply({"stopped": True, "threads": threading.active_count()})
        elif command == "exit":
            reply({"bye": True})
            break
""")

CRASH = """#!/bin/sh
echo $$ >> "$PIDS_DIR/$LMCACHE_PLUGIN_NAME"
echo "crash $$"
exit 1
"""
FLOOD = f"""#!/bin/sh
echo $$ >> "$PIDS_DIR/$LMCACHE_PLUGIN_NAME"
i=0
while [ $i -lt {ROUNDS} ]; do
  seq $((i * {LINES_PER_ROUND} + 1)) $(((i + 1) * {LINES_PER_ROUND}))
  i=$((i + 1))
  sleep 1
done
exec sleep 1000
"""
IDLE = """#!/bin/sh
echo $$ >> "$PIDS_DIR/$LMCACHE_PLUGIN_NAME"
echo idle
exec sleep 1000
"""


class Host:
    """The launcher's process, driven one JSON line at a time."""

    def __init__(self, tracker: ProcessTracker, folder: Path, pids_dir: Path, log: Path) -> None:
        env = dict(os.environ, PIDS_DIR=str(pids_dir))
        self.log = log
        self.stderr = open(log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = tracker.popen([PYTHON, "-c", HOST, str(folder)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.stderr, env=env)
        self.buffer = b""
        self.pid: int = self.read(30)["ready"]
        self.ps = psutil.Process(self.pid)

    def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"host did not answer in {timeout}s ({len(self.buffer)} "
                                     f"bytes of a reply came); its log and stacks:\n"
                                     + self.stacks())
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise AssertionError("host exited; its log:\n" + self.log.read_text()[-3000:])
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            return json.loads(line)  # type: ignore[no-any-return]
        except ValueError as exc:
            at = exc.pos if isinstance(exc, json.JSONDecodeError) else 0
            raise AssertionError(f"host sent a bad line ({exc}; {len(line)} bytes): "
                                 f"...{line[max(0, at - 200):at + 200]!r}...") from None

    def stacks(self) -> str:
        """The host's log, after asking it (SIGUSR1, faulthandler) to add every thread's stack."""
        size = self.log.stat().st_size
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            with contextlib.suppress(AssertionError):  # the log as it is, then
                wait_for(lambda: self.log.stat().st_size > size, 5, message="its stacks")
        return self.log.read_text(errors="replace")[-6000:]

    def ask(self, command: str, timeout: float = 30) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def figures(self) -> dict[str, int]:
        return {"fds": self.ps.num_fds(), "threads": self.ps.num_threads(),
                "rss": self.ps.memory_info().rss}

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask("exit", 10)
            except AssertionError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def recorded_pids(pids_dir: Path) -> dict[str, list[int]]:
    found = {}
    for path in pids_dir.iterdir():
        found[path.name] = [int(x) for x in path.read_text().split()]
    return found


def processes_in_groups(pgids: set[int]) -> list[int]:
    """Live (non-zombie) processes whose process group is one of ``pgids``."""
    left = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) in pgids and alive(proc.pid):
                left.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return left


@pytest.mark.soak
def test_soak_200_plugins_no_leaks(tmp_path: Path, tracker: ProcessTracker,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    folder = safe_dir(tmp_path / "plugins")
    pids_dir = safe_dir(tmp_path / "pids")
    for i in range(CRASHERS):
        (folder / f"all_crash_{i:03d}.sh").write_text(CRASH)
    for i in range(FLOODERS):
        (folder / f"all_flood_{i:03d}.sh").write_text(FLOOD)
    for i in range(IDLERS):
        (folder / f"all_idle_{i:03d}.sh").write_text(IDLE)

    host = Host(tracker, folder, pids_dir, tmp_path / "host.log")
    try:
        _soak(host, pids_dir, tracker, capsys)
    finally:
        host.close()


def _soak(host: Host, pids_dir: Path, tracker: ProcessTracker,
          capsys: pytest.CaptureFixture[str]) -> None:
    seen: set[int] = set()

    def status() -> dict[str, Any]:
        answer = host.ask("status")
        seen.update(answer["seen"])
        tracker.add(*answer["seen"])
        return answer

    before = host.figures()
    started = time.monotonic()
    assert host.ask("launch", 60)["launched"] == PLUGINS

    # settled: every plugin has started once and the idle ones have said so
    def launched() -> bool:
        answer = status()
        by_state = {s["name"]: s["state"] for s in answer["status"]}
        return (len(by_state) == PLUGINS
                and all(by_state[n] == "running" for n in by_state if "crash" not in n)
                and all(answer["counts"].get(f"all_idle_{i:03d}.sh") == 1
                        for i in range(IDLERS)))

    wait_for(launched, 30, interval=0.2, message="200 plugins to be up")
    launch_seconds = time.monotonic() - started
    time.sleep(1.0)  # on purpose: let the first crash/restart cycles and flood rounds happen
    settled = host.figures()

    # the soak: sample the figures every half second for the duration
    peak = dict(settled)
    deadline = started + SOAK_SECONDS
    while time.monotonic() < deadline:
        status()
        for key, value in host.figures().items():
            peak[key] = max(peak[key], value)
        time.sleep(0.5)

    # every flooded line has arrived (flooding ended halfway through the soak)
    flood_names = [f"all_flood_{i:03d}.sh" for i in range(FLOODERS)]
    def all_flooded() -> bool:  # one status() a try, not one a plugin
        counts = status()["counts"]
        return all(counts.get(n) == FLOOD_LINES for n in flood_names)

    wait_for(all_flooded, 60, interval=0.2, message="every flooded line")
    end = host.figures()
    final = status()
    counts, by_name = final["counts"], {s["name"]: s for s in final["status"]}
    assert final["disorder"] == {}, "flooded lines lost, repeated or out of order"
    for name in flood_names:
        assert by_name[name]["output_lines"] == FLOOD_LINES
        assert by_name[name]["state"] == "running"
    for i in range(IDLERS):
        name = f"all_idle_{i:03d}.sh"
        assert counts[name] == 1 and by_name[name]["restarts"] == 0
    restarts = 0
    for i in range(CRASHERS):
        s = by_name[f"all_crash_{i:03d}.sh"]
        assert s["state"] in ("starting", "running", "backoff")
        assert s["restarts"] >= 3, s  # 0.1 + 0.2 + 0.4 s: at least three in any soak
        # one line per run: each run that got to its echo was counted
        assert counts.get(s["name"], 0) in (s["restarts"], s["restarts"] + 1), s
        restarts += s["restarts"]

    stop_started = time.monotonic()
    host.ask("stop", 60)
    stop_seconds = time.monotonic() - stop_started
    # join() returns a moment before the OS thread is gone: give the kernel that moment
    with contextlib.suppress(AssertionError):
        wait_for(lambda: host.ps.num_threads() <= before["threads"], 5, message="thread exit")
    after = host.figures()

    # no plugin process is left: every PID any run recorded, every PID status() showed, and
    # anything still in one of their process groups
    runs = recorded_pids(pids_dir)
    all_pids = {p for pids in runs.values() for p in pids} | seen
    tracker.add(*all_pids)
    assert len(runs) == PLUGINS
    assert sum(len(p) for n, p in runs.items() if "crash" in n) >= restarts
    assert [p for p in all_pids if alive(p)] == []
    assert processes_in_groups(all_pids) == []
    assert [c.pid for c in host.ps.children(recursive=True) if alive(c.pid)] == []

    figures = {
        "plugins": PLUGINS, "soak_seconds": SOAK_SECONDS,
        "launch_seconds": round(launch_seconds, 2), "stop_seconds": round(stop_seconds, 2),
        "fds": [before["fds"], settled["fds"], peak["fds"], end["fds"], after["fds"]],
        "threads": [before["threads"], settled["threads"], peak["threads"], end["threads"],
                    after["threads"]],
        "rss_mb": [round(x["rss"] / MB, 1) for x in (before, settled, peak, end, after)],
        "flooded_lines": FLOOD_LINES * FLOODERS, "restarts": restarts,
        "runs": sum(len(p) for p in runs.values()), "pids_checked": len(all_pids),
    }
    with capsys.disabled():
        print("\nsoak figures (fds/threads/rss: before launch, settled, peak, end of soak, "
              f"after stop):\n{json.dumps(figures)}", file=sys.stderr)

    # back within bounds: threads exactly, fds within a couple, RSS within 30 MB
    assert end["threads"] <= settled["threads"]
    assert peak["threads"] <= settled["threads"]
    assert after["threads"] <= before["threads"]
    assert after["fds"] <= before["fds"] + FD_SLACK
    assert end["fds"] <= settled["fds"] + 3 * CRASHERS + FD_SLACK  # crashers' runs come and go
    assert end["rss"] <= settled["rss"] + RSS_BOUND
    assert after["rss"] <= settled["rss"] + RSS_BOUND
    assert stop_seconds < 10
