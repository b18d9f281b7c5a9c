"""Live reload (issue 7): ``reload()``, ``watch()``, ``watch_plugins``, ``run --watch`` and SIGHUP.

Every test runs real plugin processes from a real folder, changes that folder the way an operator
would (drop a file in, edit it, delete it, copy it slowly) and checks what a user would see: which
plugins run (by PID), the one log line per change, and ``status()``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    CLI,
    PYTHON,
    alive,
    running_pid,
    start,
    status_of,
    wait_for,
    wait_gone,
    wait_running,
    write_plugin,
)

from plugin_launcher import PluginLauncher

ROLE = "worker"
DEADLINE = 10.0  # only reached when something is wrong
START_WITHIN = 2.0  # the promise for a dropped-in plugin


def sleeper(tag: str = "") -> str:
    """A plugin that says it started (with its PID) and then idles until it is stopped."""
    return f"#!/bin/sh\necho started $$ {tag}\nexec sleep 60\n"


def make_config(plugin_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "plugin_locations": [str(plugin_dir)],
        "plugin_options": {"default": {"stop_timeout": 1.0}},
        **extra,
    }


def age(path: Path, seconds: float = 10.0) -> None:
    """Backdate a file's mtime, so reload() sees it as settled (not still being written)."""
    past = time.time() - seconds
    os.utime(path, (past, past))












# ------------------------------------------------------------------------------------- API


@pytest.mark.parametrize("how", ["watch()", "watch_plugins"])
def test_dropped_in_plugin_starts_within_two_seconds(how, plugin_dir, tracker, launchers, logs):
    write_plugin(plugin_dir, "worker_a.sh", sleeper("a"))
    config = make_config(plugin_dir, watch_plugins=how == "watch_plugins")
    launcher = start(PluginLauncher(config, ROLE), launchers)
    if how == "watch()":
        launcher.watch()
    a_pid = wait_running(launcher, "worker_a.sh", tracker)

    dropped = time.monotonic()
    write_plugin(plugin_dir, "worker_b.sh", sleeper("b"))
    b_pid = wait_running(launcher, "worker_b.sh", tracker, timeout=START_WITHIN + 1)
    elapsed = time.monotonic() - dropped
    assert elapsed < START_WITHIN, f"dropped-in plugin took {elapsed:.2f}s to start"

    wait_for(lambda: logs.output("worker_b.sh"), message="worker_b.sh output")
    assert logs.output("worker_b.sh") == [f"started {b_pid} b"]
    assert logs.count("started new plugin worker_b.sh") == 1
    assert status_of(launcher, "worker_b.sh")["change"] == "added"
    assert running_pid(launcher, "worker_a.sh") == a_pid  # left alone
    assert logs.started_pids("worker_a.sh") == [a_pid]


def test_plugin_in_new_subfolder_starts(plugin_dir, tracker, launchers, logs):
    launcher = start(PluginLauncher(make_config(plugin_dir), ROLE), launchers)
    launcher.watch()
    sub = plugin_dir / "extra"
    sub.mkdir(mode=0o755)
    write_plugin(sub, "worker_deep.sh", sleeper("deep"))
    pid = wait_running(launcher, "extra/worker_deep.sh", tracker, timeout=START_WITHIN + 1)
    assert logs.started_pids("extra/worker_deep.sh") == [pid]
    assert logs.count("started new plugin extra/worker_deep.sh") == 1


def test_deleted_plugin_stops(plugin_dir, tracker, launchers, logs):
    write_plugin(plugin_dir, "worker_a.sh", sleeper("a"))
    b_path = write_plugin(plugin_dir, "worker_b.sh", sleeper("b"))
    launcher = start(PluginLauncher(make_config(plugin_dir), ROLE), launchers)
    launcher.watch()
    a_pid = wait_running(launcher, "worker_a.sh", tracker)
    b_pid = wait_running(launcher, "worker_b.sh", tracker)

    b_path.unlink()
    wait_gone([b_pid], timeout=START_WITHIN + 1)
    wait_for(lambda: status_of(launcher, "worker_b.sh")["state"] == "stopped",
             message="worker_b.sh to show as stopped")
    entry = status_of(launcher, "worker_b.sh")
    assert entry["change"] == "removed"
    assert logs.count("stopping removed plugin worker_b.sh") == 1
    assert running_pid(launcher, "worker_a.sh") == a_pid
    assert logs.started_pids("worker_b.sh") == [b_pid]  # not started again


def test_edited_plugin_restarts_exactly_once(plugin_dir, tracker, launchers, logs):
    a_path = write_plugin(plugin_dir, "worker_a.sh", sleeper("v1"))
    write_plugin(plugin_dir, "worker_other.sh", sleeper("other"))
    launcher = start(PluginLauncher(make_config(plugin_dir), ROLE), launchers)
    launcher.watch()
    old_pid = wait_running(launcher, "worker_a.sh", tracker)
    other_pid = wait_running(launcher, "worker_other.sh", tracker)

    a_path.write_text(sleeper("v2 with a longer tag"))
    wait_for(lambda: len(logs.started_pids("worker_a.sh")) == 2, START_WITHIN + 2,
             message="worker_a.sh to be restarted")
    new_pid = logs.started_pids("worker_a.sh")[1]
    tracker.add(new_pid)
    wait_gone([old_pid])
    assert wait_running(launcher, "worker_a.sh", tracker) == new_pid
    wait_for(lambda: f"started {new_pid} v2 with a longer tag" in logs.output("worker_a.sh"),
             message="the new version's output")

    time.sleep(1.0)  # on purpose: a second, spurious restart would happen within this time
    assert logs.started_pids("worker_a.sh") == [old_pid, new_pid]
    assert logs.count("restarting changed plugin worker_a.sh") == 1
    assert status_of(launcher, "worker_a.sh")["change"] == "changed"
    assert running_pid(launcher, "worker_other.sh") == other_pid
    assert logs.started_pids("worker_other.sh") == [other_pid]


def test_restarted_plugin_is_left_alone_by_the_next_reload(plugin_dir, tracker, launchers, logs):
    """Edit a plugin (one restart), then drop in another: the edited one must not restart again."""
    a_path = write_plugin(plugin_dir, "worker_a.sh", sleeper("v1"))
    launcher = start(PluginLauncher(make_config(plugin_dir), ROLE), launchers)
    launcher.watch()
    old_pid = wait_running(launcher, "worker_a.sh", tracker)
    a_path.write_text(sleeper("v2 edited"))
    wait_for(lambda: len(logs.started_pids("worker_a.sh")) == 2, START_WITHIN + 2,
             message="worker_a.sh to be restarted")
    new_pid = wait_running(launcher, "worker_a.sh", tracker)
    assert new_pid != old_pid

    write_plugin(plugin_dir, "worker_b.sh", sleeper("b"))
    wait_running(launcher, "worker_b.sh", tracker, timeout=START_WITHIN + 1)
    time.sleep(0.3)  # on purpose: let a wrong restart of worker_a.sh begin
    assert launcher.reload() == {"started": [], "stopped": [], "restarted": [], "deferred": []}
    assert logs.started_pids("worker_a.sh") == [old_pid, new_pid]
    assert logs.count("restarting changed plugin worker_a.sh") == 1
    assert running_pid(launcher, "worker_a.sh") == new_pid


def test_unchanged_plugins_keep_their_pid_across_reloads(plugin_dir, tracker, launchers, logs):
    age(write_plugin(plugin_dir, "worker_a.sh", sleeper("a")))
    launcher = start(PluginLauncher(make_config(plugin_dir), ROLE), launchers)
    a_pid = wait_running(launcher, "worker_a.sh", tracker)
    nothing = {"started": [], "stopped": [], "restarted": [], "deferred": []}
    for _ in range(3):
        assert launcher.reload() == nothing
    b_path = write_plugin(plugin_dir, "worker_b.sh", sleeper("b"))
    age(b_path)
    assert launcher.reload() == {**nothing, "started": ["worker_b.sh"]}
    wait_running(launcher, "worker_b.sh", tracker)
    assert launcher.reload() == nothing
    assert running_pid(launcher, "worker_a.sh") == a_pid
    assert logs.started_pids("worker_a.sh") == [a_pid]
    assert status_of(launcher, "worker_a.sh")["change"] is None


def test_reload_of_a_young_unchanged_plugin_reports_nothing(plugin_dir, tracker, launchers, logs):
    """Files written just before launch are running and unchanged: nothing to defer."""
    write_plugin(plugin_dir, "worker_a.sh", sleeper("a"))
    launcher = start(PluginLauncher(make_config(plugin_dir), ROLE), launchers)
    a_pid = wait_running(launcher, "worker_a.sh", tracker)
    assert launcher.reload() == {"started": [], "stopped": [], "restarted": [], "deferred": []}
    assert running_pid(launcher, "worker_a.sh") == a_pid


def test_reload_returns_what_it_did(plugin_dir, tracker, launchers, logs):
    """Without watching: one reload() starts, stops and restarts, and reports each name."""
    a_path = write_plugin(plugin_dir, "worker_a.sh", sleeper("a1"))
    b_path = write_plugin(plugin_dir, "worker_b.sh", sleeper("b"))
    for path in (a_path, b_path, write_plugin(plugin_dir, "worker_keep.sh", sleeper("keep"))):
        age(path, 20.0)  # settled files (the edit below gets a different, later mtime)
    launcher = start(PluginLauncher(make_config(plugin_dir), ROLE), launchers)
    a_pid = wait_running(launcher, "worker_a.sh", tracker)
    b_pid = wait_running(launcher, "worker_b.sh", tracker)
    keep_pid = wait_running(launcher, "worker_keep.sh", tracker)

    a_path.write_text(sleeper("a2, edited"))
    age(a_path)
    b_path.unlink()
    age(write_plugin(plugin_dir, "worker_c.sh", sleeper("c")))
    changes = launcher.reload()
    assert changes == {"started": ["worker_c.sh"], "stopped": ["worker_b.sh"],
                       "restarted": ["worker_a.sh"], "deferred": []}
    wait_gone([a_pid, b_pid])
    new_a = wait_running(launcher, "worker_a.sh", tracker)
    assert new_a != a_pid
    wait_running(launcher, "worker_c.sh", tracker)
    assert running_pid(launcher, "worker_keep.sh") == keep_pid
    for line in ("started new plugin worker_c.sh", "stopping removed plugin worker_b.sh",
                 "restarting changed plugin worker_a.sh"):
        assert logs.count(line) == 1, line
    wait_for(lambda: status_of(launcher, "worker_b.sh")["state"] == "stopped")
    states = {e["name"]: (e["state"], e["change"]) for e in launcher.status()}
    assert states == {"worker_a.sh": ("running", "changed"), "worker_b.sh": ("stopped", "removed"),
                      "worker_c.sh": ("running", "added"), "worker_keep.sh": ("running", None)}


def test_reload_defers_a_file_still_being_written(plugin_dir, tracker, launchers, logs):
    """A file written just now may be incomplete: reload() defers it, then starts it by itself."""
    age(write_plugin(plugin_dir, "worker_a.sh", sleeper("a")))
    launcher = start(PluginLauncher(make_config(plugin_dir), ROLE), launchers)
    a_pid = wait_running(launcher, "worker_a.sh", tracker)
    write_plugin(plugin_dir, "worker_d.sh", sleeper("d"))
    changes = launcher.reload()
    assert changes == {"started": [], "stopped": [], "restarted": [], "deferred": ["worker_d.sh"]}
    assert status_of(launcher, "worker_d.sh") is None
    d_pid = wait_running(launcher, "worker_d.sh", tracker, timeout=START_WITHIN + 1)
    assert logs.started_pids("worker_d.sh") == [d_pid]
    assert logs.count("started new plugin worker_d.sh") == 1
    assert running_pid(launcher, "worker_a.sh") == a_pid


def test_slowly_written_plugin_starts_once_complete(plugin_dir, tracker, launchers, logs):
    """A file copied in five flushed pieces, 0.2 s apart, starts once, and only when whole.

    Every prefix of the file is a valid program that exits at once, so a start of a half-written
    file would show as an extra start without the marker printed by the last piece."""
    launcher = start(PluginLauncher(make_config(plugin_dir), ROLE), launchers)
    launcher.watch()
    pieces = [f"#!{PYTHON}\nimport time\nprint('begin')\n",
              "print('piece 2')\n", "print('piece 3')\n", "print('piece 4')\n",
              "print('COMPLETE-MARKER')\ntime.sleep(60)\n"]
    path = plugin_dir / "worker_slow.py"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        for i, piece in enumerate(pieces):
            if i:
                time.sleep(0.2)  # on purpose: a slow copy
            f.write(piece)
            f.flush()
    wait_for(lambda: "COMPLETE-MARKER" in logs.output("worker_slow.py"), START_WITHIN + 2,
             message="the complete plugin's marker")
    pid = wait_running(launcher, "worker_slow.py", tracker)
    time.sleep(0.8)  # on purpose: a late second start would show up here
    assert logs.started_pids("worker_slow.py") == [pid]
    assert logs.output("worker_slow.py") == ["begin", "piece 2", "piece 3", "piece 4",
                                             "COMPLETE-MARKER"]
    assert logs.count("started new plugin worker_slow.py") == 1


def test_stopping_with_a_reload_pending_starts_nothing(plugin_dir, tracker, launchers, logs):
    """stop_plugins() while a dropped-in file waits to settle: returns, and nothing new runs."""
    stubborn = "#!/bin/sh\ntrap '' TERM\necho started $$\nexec sleep 60\n"
    write_plugin(plugin_dir, "worker_stubborn.sh", stubborn)
    config = make_config(plugin_dir)
    config["plugin_options"]["default"]["stop_timeout"] = 1.5
    launcher = start(PluginLauncher(config, ROLE), launchers)
    launcher.watch()
    stubborn_pid = wait_running(launcher, "worker_stubborn.sh", tracker)
    plugins = launcher.plugins

    write_plugin(plugin_dir, "worker_late.sh", sleeper("late"))
    stopper = threading.Thread(target=launcher.stop_plugins, daemon=True)
    stopper.start()  # the stubborn plugin keeps it busy for 1.5 s: the reload timer fires
    stopper.join(4.0)  # the stop itself takes 1.5 s
    hung = stopper.is_alive()
    if hung:  # unblock it: end whatever the launcher started meanwhile
        for proc in launcher.plugins:
            if proc.pid is not None:
                tracker.add(proc.pid)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        stopper.join(DEADLINE)
    assert not hung, "stop_plugins() did not return: a pending reload started a plugin"
    assert not alive(stubborn_pid)
    assert not any(p.running for p in plugins)
    assert logs.started_pids("worker_late.sh") == []


# ------------------------------------------------------------------------------------- CLI


class Lines:
    """Collects a pipe's lines on a thread so the test can poll them with deadlines."""

    def __init__(self, pipe: Any) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: Any) -> None:
        for raw in pipe:
            with self._lock:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def having(self, text: str) -> list[str]:
        return [line for line in self.snapshot() if text in line]

    def ending(self, text: str) -> list[str]:
        return [line for line in self.snapshot() if line.endswith(text)]

    def join(self) -> None:
        self._thread.join(DEADLINE)


def run_cli(tracker: Any, *args: str) -> tuple[subprocess.Popen[bytes], Lines, Lines]:
    proc = tracker.popen([*CLI, "run", "--role", ROLE, "--stop-timeout", "1", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return proc, Lines(proc.stdout), Lines(proc.stderr)


def plugin_pid(out: Lines, name: str, tag: str) -> int:
    """The PID a sleeper plugin printed on the run's stdout ("[name] started PID tag")."""
    lines = wait_for(lambda: [ln for ln in out.snapshot()
                              if ln.startswith(f"[{name}] started ") and ln.endswith(f" {tag}")],
                     DEADLINE, message=f"{name} ({tag}) to print its PID")
    return int(lines[-1].split()[2])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def finish(proc: subprocess.Popen[bytes], out: Lines, err: Lines) -> int:
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(DEADLINE)
    out.join()
    err.join()
    return code


def test_cli_watch_follows_the_folder(plugin_dir, tracker):
    write_plugin(plugin_dir, "worker_a.sh", sleeper("a"))
    proc, out, err = run_cli(tracker, "--plugin-location", str(plugin_dir), "--watch",
                             "--status-addr", "127.0.0.1:0")
    # The status line is logged after launch_plugins() returned, i.e. once the watch is set up.
    line = wait_for(lambda: err.having("serving status on http://127.0.0.1:"), DEADLINE,
                    message="the status address")[0]
    url = re.search(r"(http://127\.0\.0\.1:\d+)/status", line).group(1) + "/status"
    a_pid = plugin_pid(out, "worker_a.sh", "a")
    tracker.add(a_pid)

    # Idle with --watch on: the launcher must not poll.
    before = cpu_seconds(proc.pid)
    time.sleep(3.0)  # on purpose: measure the idle cost
    idle = cpu_seconds(proc.pid) - before
    assert idle < 0.05, f"run --watch used {idle:.3f}s CPU in 3 s idle"

    dropped = time.monotonic()
    b_path = write_plugin(plugin_dir, "worker_b.sh", sleeper("b1"))
    b_pid = plugin_pid(out, "worker_b.sh", "b1")
    tracker.add(b_pid)
    assert time.monotonic() - dropped < START_WITHIN + 0.5
    assert len(err.ending("started new plugin worker_b.sh")) == 1

    b_path.write_text(sleeper("b2"))
    b2_pid = plugin_pid(out, "worker_b.sh", "b2")
    tracker.add(b2_pid)
    wait_gone([b_pid])
    assert len(err.ending("restarting changed plugin worker_b.sh")) == 1

    b_path.unlink()
    wait_gone([b2_pid], timeout=START_WITHIN + 1)
    wait_for(lambda: err.ending("stopping removed plugin worker_b.sh"),
             message="the removal log line")

    def b_status() -> dict[str, Any]:
        with urllib.request.urlopen(url, timeout=5) as response:
            entries = json.load(response)
        return next(e for e in entries if e["name"] == "worker_b.sh")

    wait_for(lambda: b_status()["state"] == "stopped", message="worker_b.sh stopped in /status")
    assert b_status()["change"] == "removed"
    assert alive(a_pid)
    assert len(out.having("[worker_a.sh] started")) == 1  # never restarted

    assert finish(proc, out, err) == 0
    wait_gone([a_pid])
    assert len(err.ending("stopping removed plugin worker_b.sh")) == 1
    assert len(err.ending("restarting changed plugin worker_b.sh")) == 1
    assert len(err.ending("started new plugin worker_b.sh")) == 1


def test_cli_sighup_reloads_once(plugin_dir, tracker):
    write_plugin(plugin_dir, "worker_a.sh", sleeper("a"))
    proc, out, err = run_cli(tracker, "--plugin-location", str(plugin_dir))
    a_pid = plugin_pid(out, "worker_a.sh", "a")
    tracker.add(a_pid)

    write_plugin(plugin_dir, "worker_b.sh", sleeper("b"))
    time.sleep(1.0)  # on purpose: without --watch a new file is not picked up by itself
    assert not out.having("[worker_b.sh]")
    assert not err.having("worker_b.sh")

    proc.send_signal(signal.SIGHUP)
    b_pid = plugin_pid(out, "worker_b.sh", "b")
    tracker.add(b_pid)
    assert len(err.ending("SIGHUP: reloading plugins")) == 1
    assert len(err.ending("started new plugin worker_b.sh")) == 1
    assert proc.poll() is None  # SIGHUP reloads; it does not stop the launcher
    assert alive(a_pid)
    assert len(out.having("[worker_a.sh] started")) == 1

    assert finish(proc, out, err) == 0
    wait_gone([a_pid, b_pid])
    assert len(out.having("[worker_b.sh] started")) == 1
