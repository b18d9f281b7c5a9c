"""Nothing a reader does can stall the supervisor loop (issue 12).

A stdout reader that stops reading, a guardian that stops reading its pipe, a sink that blocks
forever: signals, exits, timers and ``stop_plugins`` are still served within their bounds, and
nothing is lost for a reader that is merely slow.  The API cases run in a separate host process
so that a regression (a hang) fails the test after its deadline instead of hanging the suite.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import termios
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import CLI, PYTHON, ProcessTracker, alive, wait_for, wait_gone, write_plugin

FLOOD = '#!/bin/bash\nyes "flood line of a plugin that never stops printing"\n'
NUMBERED = """#!/usr/bin/env python3
import sys
out = sys.stdout.buffer
for start in range(0, {n}, 1000):
    out.write(b"".join(b"%d\\n" % i for i in range(start, min({n}, start + 1000))))
out.flush()
"""


def pipe_bytes(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD)."""
    buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(buf, "little")


def pipe_full(fd: int) -> bool:
    return pipe_bytes(fd) >= fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) - 4096  # less one page


def started_pids(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"started plugin \S+ \(pid (\d+)\)", text)]


def run_host(script: str, tracker: ProcessTracker, timeout: float = 30.0) -> dict[str, Any]:
    """Run ``script`` (Python, using the API) in its own process; its last stdout line is a
    JSON report.  A hang is a test failure after ``timeout``, never a hung suite."""
    proc = tracker.popen([PYTHON, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:  # its guardian inherited stderr; a stopped one would hold it open forever
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            err = "(no stderr: held open by a child)"
        pytest.fail(f"host process hung for {timeout}s:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    tracker.add(*report.get("pids", []))
    return report


# --------------------------------------------------------------------------- stalled stdout
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_sigterm_with_a_stalled_stdout_reader_exits_within_stop_timeout(
        plugin_dir: Path, tracker: ProcessTracker, tmp_path: Path, log_format: str) -> None:
    """`run | reader` where the reader never reads: SIGTERM stops every plugin and `run`
    exits within stop timeout + 2 s (before: blocked in write() until the reader read)."""
    write_plugin(plugin_dir, "all_flood.sh", FLOOD)
    write_plugin(plugin_dir, "all_flood2.sh", FLOOD)
    read_end, write_end = os.pipe()
    err = tmp_path / "err"
    with open(err, "w") as errf:
        proc = tracker.popen([*CLI, "run", "--role", "worker", "--plugin-location",
                              str(plugin_dir), "--stop-timeout", "1", "--log-format",
                              log_format], stdout=write_end, stderr=errf)
    os.close(write_end)
    try:
        pids = wait_for(lambda: (lambda p: p if len(p) == 2 else None)(
            started_pids(err.read_text())), message="both plugins to start")
        tracker.add(*pids)
        wait_for(lambda: pipe_full(read_end), message="the stdout pipe to fill up")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        elapsed = time.monotonic() - started
        assert code == 0, err.read_text()
        assert elapsed < 1 + 2, f"exit took {elapsed:.1f}s"
        wait_gone(pids, timeout=1)
        assert "SIGTERM: stopping plugins" in err.read_text()
    finally:
        os.close(read_end)


def test_sigterm_with_stdout_and_stderr_to_one_stalled_reader(
        plugin_dir: Path, tracker: ProcessTracker, tmp_path: Path) -> None:
    """`run 2>&1 | reader` where the reader never reads: our own messages (a plugin restarting
    over and over logs two lines a run) go to the same full pipe, yet the loop goes on and
    SIGTERM stops everything within stop timeout + 2 s (before: the loop blocked in the log
    handler's write() until the reader read)."""
    runs = tmp_path / "runs"
    write_plugin(plugin_dir, "all_flood.sh", FLOOD)
    write_plugin(plugin_dir, "all_flap.sh", f"#!/bin/sh\necho $$ >> {runs}\nexit 1\n")
    config = tmp_path / "lmcache.yaml"
    config.write_text(f"plugin_locations: [{str(plugin_dir)!r}]\n"
                      "plugin_options:\n  all_flap.sh: {restart: always, max_restarts: 0, "
                      "backoff: {initial: 0.05, max: 0.05}}\n")
    read_end, write_end = os.pipe()
    proc = tracker.popen([*CLI, "run", "--role", "worker", "--config", str(config),
                          "--stop-timeout", "1"], stdout=write_end, stderr=write_end)
    os.close(write_end)

    def flap_runs() -> list[int]:
        return [int(x) for x in runs.read_text().split()] if runs.exists() else []

    try:
        wait_for(lambda: pipe_full(read_end), message="the pipe to fill up")
        before = len(flap_runs())
        # every run of all_flap.sh logs "exited" and "restarting" into the full pipe
        wait_for(lambda: len(flap_runs()) >= before + 5,
                 message="all_flap.sh to be restarted while the pipe is full")
        tracker.add(*flap_runs())
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        elapsed = time.monotonic() - started
        assert code == 0
        assert elapsed < 1 + 2, f"exit took {elapsed:.1f}s"
        wait_gone(flap_runs(), timeout=1)
    finally:
        os.close(read_end)


def test_slow_reader_gets_every_line_in_order(plugin_dir: Path, tracker: ProcessTracker,
                                              tmp_path: Path) -> None:
    """A reader slower than the plugins (the sink buffer fills and reading pauses again and
    again) still gets every line of every plugin, in order."""
    n = 150_000
    for name in ("all_a.py", "all_b.py"):
        write_plugin(plugin_dir, name, NUMBERED.format(n=n))
    reader = (
        "import os, sys, time\n"
        "out = open(sys.argv[1], 'wb')\n"
        "while True:\n"
        "    chunk = os.read(0, 16384)\n"
        "    if not chunk: break\n"
        "    out.write(chunk)\n"
        "    time.sleep(0.002)\n"  # a slow consumer, not synchronisation
    )
    got = tmp_path / "got"
    run = tracker.popen([*CLI, "run", "--role", "worker", "--plugin-location", str(plugin_dir)],
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert run.stdout is not None
    slow = tracker.popen([PYTHON, "-c", reader, str(got)], stdin=run.stdout)
    run.stdout.close()
    assert run.wait(timeout=60) == 0
    assert slow.wait(timeout=60) == 0
    lines = got.read_bytes().decode().splitlines()
    for name in ("all_a.py", "all_b.py"):
        mine = [line.split("] ", 1)[1] for line in lines if line.startswith(f"[{name}] ")]
        assert mine == [str(i) for i in range(n)], f"{name}: {len(mine)} lines"


# ----------------------------------------------------------------- the loop while sink is full
def test_loop_handles_exits_and_timers_while_the_sink_is_full(plugin_dir: Path,
                                                              tracker: ProcessTracker) -> None:
    """With the sink full (a pipe nobody reads), a plugin's exit is still seen, a timeout still
    fires, status answers, and stop_plugins returns with every plugin gone."""
    write_plugin(plugin_dir, "all_flood.sh", FLOOD)
    write_plugin(plugin_dir, "all_exits.sh", "#!/bin/bash\nsleep 1\nexit 3\n")
    write_plugin(plugin_dir, "all_slow.sh", "#!/bin/bash\nexec sleep 1000\n")
    report = run_host(f"""
        import json, os, time
        from plugin_launcher import PluginLauncher
        from plugin_launcher.output import StreamSink
        r, w = os.pipe()  # nobody reads r
        sink = StreamSink(w, limit=256 * 1024)
        config = {{"plugin_locations": [{str(plugin_dir)!r}],
                   "plugin_options": {{"all_slow.sh": {{"timeout": 1.5}}}}}}
        launcher = PluginLauncher(config, "worker", sink=sink)
        launcher.launch_plugins()
        pids = [p.pid for p in launcher.plugins]
        def state(name):
            return next(e for e in launcher.status() if e["name"] == name)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (
                sink.full() and state("all_exits.sh")["state"] == "exited"
                and state("all_slow.sh")["state"] == "exited"):
            time.sleep(0.05)
        result = {{"full": sink.full(), "exits": state("all_exits.sh"),
                   "slow": state("all_slow.sh"), "flood": state("all_flood.sh")["state"],
                   "pids": pids}}
        t0 = time.monotonic()
        launcher.stop_plugins(timeout=1)
        result["stop"] = time.monotonic() - t0
        print(json.dumps(result))
    """, tracker)
    assert report["full"], "the sink should be full"
    assert report["exits"]["state"] == "exited" and report["exits"]["returncode"] == 3
    assert report["slow"]["state"] == "exited" and report["slow"]["returncode"] != 0
    assert report["flood"] == "running"
    assert report["stop"] < 3
    wait_gone(report["pids"], timeout=2)


# ---------------------------------------------------------------------------- guardian stalls
def test_a_stopped_guardian_does_not_stall_the_loop(plugin_dir: Path, tracker: ProcessTracker,
                                                    tmp_path: Path) -> None:
    """The guardian is SIGSTOPped and its pipe (shrunk to one page) fills with the messages of
    a restart storm: the loop keeps supervising and stop_plugins returns at once."""
    for i in range(10):
        write_plugin(plugin_dir, f"all_crash{i}.sh", "#!/bin/bash\nexit 1\n")
    write_plugin(plugin_dir, "all_talk.sh", "#!/bin/bash\nwhile :; do echo x; sleep 0.05; done\n")
    gpid_file = tmp_path / "guardian.pid"
    try:
        report = _stopped_guardian_host(plugin_dir, gpid_file, tracker)
    finally:  # a guardian left stopped by a failure: let it go, it then ends the plugins
        if gpid_file.exists():
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(int(gpid_file.read_text()), sig)
                except ProcessLookupError:
                    pass
    assert report["stalled"], "the guardian's pipe should have filled up"
    assert report["after"] >= report["before"] + 20, "restarts went on while it was stopped"
    assert report["stop"] < 3
    wait_gone(report["pids"], timeout=2)


def _stopped_guardian_host(plugin_dir: Path, gpid_file: Path,
                           tracker: ProcessTracker) -> dict[str, Any]:
    return run_host(f"""
        import fcntl, json, os, signal, termios, time
        from plugin_launcher import PluginLauncher
        config = {{"plugin_locations": [{str(plugin_dir)!r}],
                   "plugin_options": {{"default": {{"restart": "always", "max_restarts": 0,
                       "backoff": {{"initial": 0.05, "max": 0.05}}}}}}}}
        launcher = PluginLauncher(config, "worker")
        launcher.launch_plugins()
        guardian = launcher._supervisor.guardian
        gpid = guardian._popen.pid
        with open({str(gpid_file)!r}, "w") as f:
            f.write(str(gpid))
        os.kill(gpid, signal.SIGSTOP)
        fd = guardian._fd
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 4096)  # one page fills fast
        def unread():
            return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, bytes(4)), "little")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and unread() < 4096 - 64:
            time.sleep(0.05)
        stalled = unread() >= 4096 - 64
        before = sum(e["restarts"] for e in launcher.status())
        lines = next(e for e in launcher.status() if e["name"] == "all_talk.sh")["output_lines"]
        while time.monotonic() < deadline and (
                sum(e["restarts"] for e in launcher.status()) < before + 20
                or next(e for e in launcher.status()
                        if e["name"] == "all_talk.sh")["output_lines"] < lines + 5):
            time.sleep(0.05)
        after = sum(e["restarts"] for e in launcher.status())
        pids = [p.pid for p in launcher.plugins if p.pid]
        t0 = time.monotonic()
        launcher.stop_plugins(timeout=1)
        stop = time.monotonic() - t0
        os.kill(gpid, signal.SIGKILL)
        print(json.dumps({{"stalled": stalled, "before": before, "after": after,
                          "stop": stop, "pids": pids}}))
    """, tracker)


# ------------------------------------------------------------------------------ a stuck loop
def test_stop_plugins_returns_within_its_bound_when_the_loop_is_stuck(
        plugin_dir: Path, tracker: ProcessTracker) -> None:
    """A custom sink whose write never returns wedges the loop: stop_plugins still ends every
    plugin group (TERM, then KILL after the timeout) from the caller's thread and returns
    within timeout + 5 s (before: it waited forever)."""
    write_plugin(plugin_dir, "all_talks.sh", "#!/bin/bash\necho hello\nexec sleep 1000\n")
    write_plugin(plugin_dir, "all_deaf.sh",
                 "#!/bin/bash\ntrap '' TERM\nwhile :; do sleep 1; done\n")
    report = run_host(f"""
        import json, threading, time
        from plugin_launcher import PluginLauncher
        class Wedged:
            def __init__(self):
                self.entered = threading.Event()
            def write(self, name, stream, block, pid=None):
                self.entered.set()
                threading.Event().wait()  # forever
        sink = Wedged()
        launcher = PluginLauncher({{"plugin_locations": [{str(plugin_dir)!r}]}}, "worker",
                                  sink=sink)
        launcher.launch_plugins()
        pids = [p.pid for p in launcher.plugins]
        assert sink.entered.wait(10)
        t0 = time.monotonic()
        launcher.stop_plugins(timeout=1)
        print(json.dumps({{"stop": time.monotonic() - t0, "pids": pids}}))
    """, tracker)
    assert report["stop"] < 1 + 5, f"stop_plugins took {report['stop']:.1f}s"
    wait_gone(report["pids"], timeout=1)


def test_a_fifo_as_log_file_does_not_hang_the_loop(plugin_dir: Path, tracker: ProcessTracker,
                                                   tmp_path: Path) -> None:
    """log_file naming a FIFO nobody reads is one error line, not a loop blocked in open()."""
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)
    write_plugin(plugin_dir, "all_p.sh", "#!/bin/bash\necho one\nexec sleep 1000\n")
    report = run_host(f"""
        import json, logging, time
        from plugin_launcher import PluginLauncher
        logging.basicConfig(level=logging.INFO)
        config = {{"plugin_locations": [{str(plugin_dir)!r}],
                   "plugin_options": {{"default": {{"log_file": {str(fifo)!r}}}}}}}
        launcher = PluginLauncher(config, "worker")
        launcher.launch_plugins()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and launcher.status()[0]["output_lines"] < 1:
            time.sleep(0.05)
        lines = launcher.status()[0]["output_lines"]
        pids = [p.pid for p in launcher.plugins]
        launcher.stop_plugins(timeout=1)
        print(json.dumps({{"lines": lines, "pids": pids}}))
    """, tracker, timeout=20)
    assert report["lines"] == 1
    assert all(not alive(pid) for pid in report["pids"])


# ------------------------------------------------------------------------------ low-cost mode
@pytest.mark.parametrize("batch", ["0.05", "0"])
def test_output_batch_delivers_every_line_in_order(plugin_dir: Path, tracker: ProcessTracker,
                                                   tmp_path: Path, batch: str) -> None:
    n = 30_000
    names = [f"all_p{i}.py" for i in range(4)]
    for name in names:
        write_plugin(plugin_dir, name, NUMBERED.format(n=n))
    out = tmp_path / "out"
    with open(out, "wb") as f:
        proc = tracker.popen([*CLI, "run", "--role", "worker", "--plugin-location",
                              str(plugin_dir), "--output-batch", batch], stdout=f,
                             stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = out.read_text().splitlines()
    for name in names:
        mine = [line.split("] ", 1)[1] for line in lines if line.startswith(f"[{name}] ")]
        assert mine == [str(i) for i in range(n)], f"{name}: {len(mine)} lines"


def test_low_cost_mode_does_not_throttle_a_flood_of_long_lines(
        plugin_dir: Path, tracker: ProcessTracker, tmp_path: Path) -> None:
    """60 MB in 30 kB lines, written as fast as the pipe takes them, in the default low-cost
    mode: a writer blocked on a full pipe can leave less than 64 KiB in it, which was not seen
    as a flood, so every read was followed by the 20 ms pause: 64 KiB per 20 ms, about 3 MB/s
    (20 s here). Every line arrives whole and in order, in a few seconds at most."""
    n = 2000
    write_plugin(plugin_dir, "all_long.py",
                 "import sys\nout = sys.stdout.buffer\n"
                 f"for i in range({n}):\n    out.write(b'%05d' % i + b'x' * 29995 + b'\\n')\n",
                 0o644)
    out = tmp_path / "out"
    with open(out, "wb") as f:
        proc = tracker.popen([*CLI, "run", "--role", "worker", "--plugin-location",
                              str(plugin_dir)], stdout=f, stderr=subprocess.PIPE)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"60 MB took over 10 s: {out.stat().st_size >> 20} MiB written so far")
    assert proc.returncode == 0, err
    lines = out.read_bytes().split(b"\n")[:-1]
    assert [line[len(b"[all_long.py] "):][:5] for line in lines] == [b"%05d" % i
                                                                      for i in range(n)]
    assert all(len(line) == len(b"[all_long.py] ") + 30000 for line in lines)


def test_output_batch_bad_value_is_one_error_line(plugin_dir: Path) -> None:
    result = subprocess.run([*CLI, "run", "--role", "worker", "--plugin-location",
                             str(plugin_dir), "--output-batch", "5"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --output-batch: output_batch must be between 0 and 1 seconds, got 5.0"]
