"""Lifetime: no plugin process outlives the process that owns the launcher, however it ends.

Every test runs real plugins that start grandchildren, records every PID they report, and checks
by PID that all of them are gone in time.  The host tests run the launcher in a separate Python
process and end it in each way the issue lists: return, unhandled exception, os._exit, SIGTERM,
SIGINT (Python's default handling) and SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    BASH_WITH_GRANDCHILD,
    PYTHON,
    PYTHON_IGNORES_TERM,
    alive,
    read_pids,
    wait_for,
    write_plugin,
)

from plugin_launcher import PluginLauncher

STOP = 1.0  # the stop timeout used by these tests (seconds between SIGTERM and SIGKILL)
GRACE = 2.0  # the bound: nothing survives this long past the stop timeout

# A bash plugin with a grandchild: records "$$ $!" then waits (default SIGTERM handling).

# The host: owns a launcher, says "ready" once every plugin reported its PIDs, then waits for a
# line on stdin (or a signal) and ends the way argv[4] says.
HOST = """\
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # may be inherited as ignored
from plugin_launcher import PluginLauncher

folder, pid_dir, expected, mode, stop = sys.argv[1:6]
config = {"plugin_locations": [folder],
          "plugin_options": {"default": {"stop_timeout": float(stop)}}}
launcher = PluginLauncher(config, role="worker")
launcher.launch_plugins()
deadline = time.monotonic() + 20
while len([f for f in os.listdir(pid_dir) if f.endswith(".pids")]) < int(expected):
    if time.monotonic() > deadline:
        sys.exit("plugins did not report their PIDs")
    time.sleep(0.02)
print("ready", flush=True)
sys.stdin.readline()
if mode == "exception":
    raise RuntimeError("host crashed on purpose")
if mode == "os_exit":
    os._exit(0)
# "return": fall off the end of the script
"""


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def all_children(pid: int) -> list[int]:
    """Children of every thread of ``pid`` (plugins are started by the supervisor thread;
    /proc/PID/task/PID/children only lists the main thread's)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for task in tasks:
        try:
            found += [int(x) for x in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return found


def guardians_of(pid: int) -> list[int]:
    return [c for c in all_children(pid) if "guardian.py" in cmdline(c)]


def all_pids(pid_dir: Path, expected_files: int) -> list[int]:
    """Wait until ``expected_files`` plugins wrote their PID files; every PID they hold."""

    def ready() -> list[int] | None:
        files = sorted(pid_dir.glob("*.pids"))
        if len(files) < expected_files:
            return None
        pids = [pid for f in files for pid in read_pids(f)]
        return pids if len(pids) == 2 * expected_files else None

    return wait_for(ready, 15, message=f"{expected_files} plugins to report their PIDs")


def gone_by(pids: list[int], deadline: float) -> None:
    """Assert every PID is gone at ``deadline`` (monotonic) at the latest."""
    def survivors() -> list[int]:
        return [p for p in pids if alive(p)]

    while survivors() and time.monotonic() < deadline:
        time.sleep(0.02)
    left = survivors()
    assert not left, f"still alive past the deadline: {[(p, cmdline(p)) for p in left]}"


def config_for(folder: Path, stop_timeout: float = STOP, **extra: Any) -> dict[str, Any]:
    return {"plugin_locations": [str(folder)],
            "plugin_options": {"default": {"stop_timeout": stop_timeout}}, **extra}


@pytest.fixture
def pid_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where plugins write their PIDs; plugins find it in $PID_DIR (inherited environment)."""
    folder = tmp_path / "pids"
    folder.mkdir()
    monkeypatch.setenv("PID_DIR", str(folder))
    return folder


# ------------------------------------------------------------------------- the host ends itself
ENDINGS = {
    # ending: (how to trigger it, expected return code of the host)
    "return": ("stdin", 0),
    "exception": ("stdin", 1),
    "os_exit": ("stdin", 0),
    "SIGTERM": (signal.SIGTERM, -signal.SIGTERM),
    "SIGINT": (signal.SIGINT, -signal.SIGINT),  # KeyboardInterrupt, then Python re-raises SIGINT
    "SIGKILL": (signal.SIGKILL, -signal.SIGKILL),
}


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_host_ending_leaves_no_plugin_process(ending: str, tmp_path: Path, plugin_dir: Path,
                                              pid_dir: Path, tracker: Any) -> None:
    write_plugin(plugin_dir, "worker_grandchild.sh", BASH_WITH_GRANDCHILD)
    write_plugin(plugin_dir, "worker_ignores_term.py", PYTHON_IGNORES_TERM)
    host_script = tmp_path / "host.py"
    host_script.write_text(HOST)
    trigger, expected_code = ENDINGS[ending]
    mode = ending if trigger == "stdin" else "signal"
    host = tracker.popen(
        [PYTHON, str(host_script), str(plugin_dir), str(pid_dir), "2", mode, str(STOP)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )
    pids = all_pids(pid_dir, 2)
    tracker.add(*pids)
    assert host.stdout.readline() == b"ready\n", "the host did not get ready"
    guardian = wait_for(lambda: guardians_of(host.pid), 5, message="the guardian")[0]
    tracker.add(guardian)
    plugin_pids = [p for p in all_children(host.pid) if p != guardian]
    assert sorted(plugin_pids) == sorted(pids[0::2]), "the plugins are the host's children"
    assert all(alive(p) for p in pids), "every plugin and grandchild runs before the host ends"

    start = time.monotonic()
    if trigger == "stdin":
        host.stdin.write(b"go\n")
        host.stdin.flush()
    else:
        os.kill(host.pid, trigger)
    gone_by([*pids, guardian, host.pid], start + STOP + GRACE)
    assert host.wait(timeout=5) == expected_code
    stderr = host.stderr.read().decode()
    if ending == "exception":
        assert "RuntimeError: host crashed on purpose" in stderr
    elif ending == "SIGINT":
        assert "KeyboardInterrupt" in stderr


# --------------------------------------------------------------------------------- stop_plugins
@pytest.mark.parametrize(("option_timeout", "argument", "expected"),
                         [(1.0, None, 1.0), (30.0, 0.5, 0.5)],
                         ids=["option-stop_timeout", "timeout-argument"])
def test_stop_plugins_kills_a_plugin_that_ignores_sigterm_after_the_timeout(
        option_timeout: float, argument: float | None, expected: float, plugin_dir: Path,
        pid_dir: Path, tracker: Any, launchers: list[PluginLauncher]) -> None:
    write_plugin(plugin_dir, "worker_ignores_term.py", PYTHON_IGNORES_TERM)
    launcher = PluginLauncher(config_for(plugin_dir, option_timeout), role="worker")
    launchers.append(launcher)
    launcher.launch_plugins()
    pids = all_pids(pid_dir, 1)
    tracker.add(*pids)
    plugins = launcher.plugins
    start = time.monotonic()
    launcher.stop_plugins(timeout=argument)
    elapsed = time.monotonic() - start
    left = [p for p in pids if alive(p)]
    assert not left, f"stop_plugins returned while {left} still run"
    assert elapsed >= expected, f"killed after {elapsed:.2f}s, before the {expected}s timeout"
    assert elapsed < expected + GRACE
    assert plugins[0].returncode == -signal.SIGKILL


def test_stop_plugins_is_idempotent(plugin_dir: Path, pid_dir: Path, tracker: Any,
                                    launchers: list[PluginLauncher]) -> None:
    write_plugin(plugin_dir, "worker_grandchild.sh", BASH_WITH_GRANDCHILD)
    launcher = PluginLauncher(config_for(plugin_dir), role="worker")
    launchers.append(launcher)
    launcher.stop_plugins()  # before any launch: nothing to do, no error
    launcher.launch_plugins()
    pids = all_pids(pid_dir, 1)
    tracker.add(*pids)
    plugins = launcher.plugins
    launcher.stop_plugins()
    assert not [p for p in pids if alive(p)]
    assert [p.running for p in plugins] == [False]
    assert plugins[0].returncode == -signal.SIGTERM
    start = time.monotonic()
    launcher.stop_plugins()
    launcher.stop_plugins(timeout=0)
    assert time.monotonic() - start < 0.5, "stopping again has nothing to wait for"
    assert not [p for p in pids if alive(p)]


SLOW_TO_EXIT = """\
#!/bin/bash
# On SIGTERM the plugin needs {plugin}s to exit, and a child it started needs {child}s.
trap 'sleep {plugin}; exit 0' TERM
( trap 'sleep {child}; exit 0' TERM; sleep 1000 & wait ) &
child=$!
echo "$$ $child" > "$PID_DIR/$LMCACHE_PLUGIN_NAME.tmp"
mv "$PID_DIR/$LMCACHE_PLUGIN_NAME.tmp" "$PID_DIR/$LMCACHE_PLUGIN_NAME.pids"
sleep 1000 &
wait
"""


def test_stop_plugins_returns_only_when_every_plugin_process_is_gone(
        plugin_dir: Path, pid_dir: Path, tracker: Any, launchers: list[PluginLauncher]) -> None:
    write_plugin(plugin_dir, "worker_slow.sh", SLOW_TO_EXIT.format(plugin=0.3, child=0.8))
    launcher = PluginLauncher(config_for(plugin_dir, stop_timeout=5), role="worker")
    launchers.append(launcher)
    launcher.launch_plugins()
    pids = all_pids(pid_dir, 1)
    tracker.add(*pids)
    start = time.monotonic()
    launcher.stop_plugins()
    elapsed = time.monotonic() - start
    assert not [p for p in pids if alive(p)], "the plugin's child still runs"
    assert elapsed >= 0.8, "returned before the plugin's child had ended"
    assert elapsed < 5, "waited for the SIGKILL although everything ended by itself"


def test_stop_plugins_stops_many_plugins_in_parallel(plugin_dir: Path, pid_dir: Path,
                                                     tracker: Any,
                                                     launchers: list[PluginLauncher]) -> None:
    count, each = 10, 0.5
    for i in range(count):
        write_plugin(plugin_dir, f"worker_slow{i}.sh", SLOW_TO_EXIT.format(plugin=each, child=0))
    launcher = PluginLauncher(config_for(plugin_dir, stop_timeout=5), role="worker")
    launchers.append(launcher)
    launcher.launch_plugins()
    pids = all_pids(pid_dir, count)
    tracker.add(*pids)
    start = time.monotonic()
    launcher.stop_plugins()
    elapsed = time.monotonic() - start
    assert not [p for p in pids if alive(p)]
    assert elapsed >= each
    assert elapsed < count * each / 2, f"{elapsed:.2f}s: the plugins were not stopped in parallel"


@pytest.mark.parametrize("raises", [False, True], ids=["clean-exit", "exception"])
def test_context_manager_stops_the_plugins_on_exit(raises: bool, plugin_dir: Path,
                                                   pid_dir: Path, tracker: Any) -> None:
    write_plugin(plugin_dir, "worker_grandchild.sh", BASH_WITH_GRANDCHILD)
    write_plugin(plugin_dir, "worker_ignores_term.py", PYTHON_IGNORES_TERM)
    pids: list[int] = []
    start = 0.0
    try:
        with PluginLauncher(config_for(plugin_dir), role="worker") as launcher:
            assert len(launcher.plugins) == 2
            pids = all_pids(pid_dir, 2)
            tracker.add(*pids)
            assert all(alive(p) for p in pids)
            start = time.monotonic()
            if raises:
                raise KeyError("boom")
    except KeyError:
        assert raises
    assert not [p for p in pids if alive(p)], "a plugin process survived the with block"
    assert time.monotonic() - start < STOP + GRACE


LEAVES_A_CHILD = """\
#!/bin/bash
sleep 1000 {redirect} &
echo "$$ $!" > "$PID_DIR/$LMCACHE_PLUGIN_NAME.tmp"
mv "$PID_DIR/$LMCACHE_PLUGIN_NAME.tmp" "$PID_DIR/$LMCACHE_PLUGIN_NAME.pids"
echo "plugin done"
exit 0
"""


@pytest.mark.parametrize("redirect", ["", ">/dev/null 2>&1 </dev/null"],
                         ids=["child-holds-output", "child-detached-output"])
def test_a_plugins_leftover_child_is_ended_when_the_plugin_exits(
        redirect: str, plugin_dir: Path, pid_dir: Path, tracker: Any,
        launchers: list[PluginLauncher], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="plugin_launcher")
    write_plugin(plugin_dir, "worker_leaves.sh", LEAVES_A_CHILD.format(redirect=redirect))
    launcher = PluginLauncher(config_for(plugin_dir), role="worker")
    launchers.append(launcher)
    start = time.monotonic()
    launcher.launch_plugins()
    pids = all_pids(pid_dir, 1)
    tracker.add(*pids)
    plugin = launcher.plugins[0]
    assert launcher.wait(timeout=STOP + GRACE), "the plugin is still reported as running"
    gone_by(pids, start + STOP + GRACE)
    assert plugin.returncode == 0
    assert plugin.state == "exited"
    lines = [r.getMessage() for r in caplog.records if r.name == "plugin_launcher"]
    assert "[worker_leaves.sh] plugin done" in lines


def test_the_guardian_is_gone_after_a_clean_stop(plugin_dir: Path, pid_dir: Path, tracker: Any,
                                                 launchers: list[PluginLauncher]) -> None:
    write_plugin(plugin_dir, "worker_grandchild.sh", BASH_WITH_GRANDCHILD)
    before = set(guardians_of(os.getpid()))
    launcher = PluginLauncher(config_for(plugin_dir), role="worker")
    launchers.append(launcher)
    launcher.launch_plugins()
    pids = all_pids(pid_dir, 1)
    tracker.add(*pids)
    guardians = [g for g in guardians_of(os.getpid()) if g not in before]
    assert len(guardians) == 1, "one guardian per launcher"
    tracker.add(*guardians)
    assert alive(guardians[0])
    launcher.stop_plugins()
    assert not [p for p in [*pids, *guardians] if alive(p)]

