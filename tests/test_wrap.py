"""Wrap mode: ``plugin-launcher run [options] -- COMMAND [ARG]...`` with real processes.

COMMAND is a small Python script; a plugin beside it records its PID, so each test can check that
the plugins ran next to COMMAND and are gone once the launcher has exited with COMMAND's code.
"""

from __future__ import annotations

import signal
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
from helpers import CLI, PYTHON, alive, read_pids, wait_for, write_plugin

# COMMAND: waits until the plugin is up (its PID file exists), then does what argv[3] says.
COMMAND = textwrap.dedent("""\
    import os, signal, sys, time
    pid_file, out, action = sys.argv[1], sys.argv[2], sys.argv[3]
    def on_signal(signum, frame):
        with open(out, "a") as f:
            f.write(signal.Signals(signum).name + "\\n")
        sys.exit(int(sys.argv[4]))
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    deadline = time.monotonic() + 15
    while not os.path.exists(pid_file) and time.monotonic() < deadline:
        time.sleep(0.01)
    if action == "exit":
        sys.exit(int(sys.argv[4]))
    if action == "kill":
        sig = int(sys.argv[4])
        if sig != signal.SIGKILL:
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    with open(out + ".ready", "w"):
        pass
    while True:
        time.sleep(0.05)
""")


@pytest.fixture
def setup(plugin_dir: Path, tmp_path: Path) -> dict[str, Path]:
    pid_file = tmp_path / "plugin.pid"
    write_plugin(plugin_dir, "all_side.sh",
                 f"#!/bin/sh\necho $$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}\n"
                 "exec sleep 30\n")
    command = tmp_path / "command.py"
    command.write_text(COMMAND)
    return {"plugins": plugin_dir, "pid_file": pid_file, "command": command,
            "out": tmp_path / "signals"}


def launcher_argv(s: dict[str, Path], action: str, arg: int) -> list[str]:
    return [*CLI, "run", "--role", "scheduler", "--plugin-location", str(s["plugins"]),
            "--stop-timeout", "1", "--",
            PYTHON, str(s["command"]), str(s["pid_file"]), str(s["out"]), action, str(arg)]


def plugin_pid(s: dict[str, Path]) -> int:
    pids = read_pids(s["pid_file"])
    assert len(pids) == 1, "the plugin ran once, beside the command"
    return pids[0]


@pytest.mark.parametrize(
    ("action", "arg", "code"),
    [
        ("exit", 0, 0),
        ("exit", 3, 3),
        ("kill", int(signal.SIGKILL), 128 + signal.SIGKILL),
        ("kill", int(signal.SIGTERM), 128 + signal.SIGTERM),
    ],
    ids=["exit-0", "exit-3", "killed-by-SIGKILL", "killed-by-SIGTERM"],
)
def test_launcher_exits_with_the_commands_code_and_stops_plugins(
    setup: dict[str, Path], tracker: Any, action: str, arg: int, code: int,
) -> None:
    result = subprocess.run(launcher_argv(setup, action, arg), capture_output=True, text=True,
                            timeout=30, stdin=subprocess.DEVNULL)
    pid = plugin_pid(setup)
    tracker.add(pid)
    assert result.returncode == code, result.stderr
    assert not alive(pid), "the plugin must be stopped before the launcher exits"
    assert "stopping plugins" in result.stderr
    if action == "kill":
        assert f"killed by {signal.Signals(arg).name}" in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=lambda s: signal.Signals(s).name)
def test_signals_to_the_launcher_are_forwarded_to_the_command(
    setup: dict[str, Path], tracker: Any, sig: int,
) -> None:
    chosen = 40 + int(sig)  # the command exits with a code that says which signal it got
    proc = tracker.popen(launcher_argv(setup, "wait", chosen), stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = Path(str(setup["out"]) + ".ready")
    wait_for(ready.exists, 15, message="the command to install its signal handlers")
    pid = plugin_pid(setup)
    tracker.add(pid)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=20)
    assert setup["out"].read_text().split() == [signal.Signals(sig).name], \
        "the command received exactly the signal sent to the launcher"
    assert proc.returncode == chosen, err
    assert not alive(pid), "the plugins are stopped once the command has exited"


def test_command_not_found_exits_127(plugin_dir: Path, tmp_path: Path, tracker: Any) -> None:
    pid_file = tmp_path / "plugin.pid"
    write_plugin(plugin_dir, "all_side.sh", f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 30\n")
    missing = str(tmp_path / "no-such-server")
    result = subprocess.run([*CLI, "run", "--role", "scheduler", "--plugin-location",
                             str(plugin_dir), "--stop-timeout", "1", "--", missing, "--port", "1"],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    tracker.add(*read_pids(pid_file))
    assert result.returncode == 127, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert any(missing in line and "No such file or directory" in line for line in error_lines), \
        result.stderr
    assert not [p for p in read_pids(pid_file) if alive(p)], "plugins stopped after the error"
