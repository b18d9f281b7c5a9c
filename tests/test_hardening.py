"""Hostile and absurd inputs, bounded (issue 12): durations, loop errors, deep configuration,
relative locations, bad files named like plugins, folders that come and go under ``--watch``,
control characters in names and output, and a status server that idle clients cannot stall.

Each test is a regression test: it fails on the code before the fix (checked by running it with
the old package first on ``PYTHONPATH``).
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import (
    CLI,
    LogRecorder,
    ProcessTracker,
    alive,
    read_pids,
    running_pid,
    safe_dir,
    start,
    status_of,
    wait_for,
    wait_gone,
    wait_running,
    write_plugin,
)

from plugin_launcher import ConfigError, PluginLauncher
from plugin_launcher.config import from_mapping
from plugin_launcher.output import StreamSink, safe_text
from plugin_launcher.status_server import serve_status

ROLE = "worker"
SLEEPER = "#!/bin/sh\necho started $$\nexec sleep 60\n"
LOG_LINE = re.compile(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} plugin-launcher [A-Z]+ ")
SERVING = re.compile(r"serving status on http://[0-9.]+:(\d+)/status")


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def config_file(tmp_path: Path, data: dict[str, Any]) -> str:
    path = tmp_path / "lmcache.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def usage_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one ``error:`` line of a CLI that refused its input (exit 2, no traceback)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ------------------------------------------------------------------------- bounded durations

DAYS30 = "must be between 0 and 2592000 seconds (30 days)"


@pytest.mark.parametrize(("options", "key", "message"), [
    ({"timeout": 3000000}, "timeout", f"{DAYS30}, got 3000000"),
    ({"timeout": float("inf")}, "timeout", f"{DAYS30}, got inf"),
    ({"stop_timeout": 1e10}, "stop_timeout",
     "must be between 0 and 3600 seconds (1 hour), got 10000000000.0"),
    ({"stop_timeout": float("inf")}, "stop_timeout",
     "must be between 0 and 3600 seconds (1 hour), got inf"),
    ({"backoff": {"initial": 0, "max": 0}}, "backoff.initial",
     "must be between 0.05 and 2592000 seconds (30 days), got 0"),
    ({"backoff": {"initial": 0.001}}, "backoff.initial",
     "must be between 0.05 and 2592000 seconds (30 days), got 0.001"),
    ({"backoff": {"max": 1e12}}, "backoff.max", f"{DAYS30}, got 1000000000000.0"),
    ({"backoff": {"reset": float("inf")}}, "backoff.reset", f"{DAYS30}, got inf"),
    ({"cpu_time_max": 10**30}, "cpu_time_max",
     "must be between 1 and 315360000, got 1000000000000000000000000000000"),
])
def test_absurd_durations_are_one_error_naming_the_key(
    tmp_path: Path, plugin_dir: Path, options: dict[str, Any], key: str, message: str,
) -> None:
    path = config_file(tmp_path, {"plugin_locations": [str(plugin_dir)],
                                  "plugin_options": {"default": options}})
    line = usage_error(cli("list", "--role", ROLE, "--config", path))
    assert line == f"error: {path}: plugin_options.default.{key}: {message}"


@pytest.mark.parametrize("value", ["inf", "nan", "1e10", "3601", "-1"])
def test_stop_timeout_flag_is_bounded(plugin_dir: Path, tmp_path: Path, value: str) -> None:
    marker = tmp_path / "ran"
    write_plugin(plugin_dir, "all_x.sh", f"#!/bin/sh\necho $$ >> {marker}\nexec sleep 30\n")
    result = cli("run", "--role", ROLE, "--plugin-location", str(plugin_dir),
                 "--stop-timeout", value)
    line = usage_error(result)
    assert line.startswith("error: --stop-timeout: must be between 0 and 3600 seconds (1 hour), "
                           "got "), line
    assert not marker.exists(), "refused before any plugin starts"


def test_longest_allowed_timeout_does_not_spin_the_loop(
    plugin_dir: Path, tmp_path: Path, tracker: ProcessTracker,
) -> None:
    """30 days is more than epoll accepts (~24.8 days): the select timeout must be capped."""
    write_plugin(plugin_dir, "all_slow.sh", SLEEPER)
    path = config_file(tmp_path, {"plugin_locations": [str(plugin_dir)],
                                  "plugin_options": {"default": {"timeout": 2592000}}})
    out_path, err_path = tmp_path / "out", tmp_path / "err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = tracker.popen([*CLI, "run", "--role", ROLE, "--config", path, "--stop-timeout",
                              "1"], stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    line = wait_for(lambda: re.search(rb"started (\d+)", out_path.read_bytes()), 10,
                    message="the plugin's first line")
    tracker.add(int(line.group(1)))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    wait_gone([int(line.group(1))])
    stderr = err_path.read_text()
    assert "internal error" not in stderr and "Traceback" not in stderr
    assert len(stderr.splitlines()) < 20, stderr[:2000]


def test_timeout_timers_do_not_outlive_their_runs(
    plugin_dir: Path, launchers: list[PluginLauncher], tmp_path: Path,
) -> None:
    """A crash loop with a long timeout: each dead run's timer is dropped, none accumulate."""
    runs = tmp_path / "runs"
    write_plugin(plugin_dir, "all_crash.sh", f"#!/bin/sh\necho $$ >> {runs}\nexit 1\n")
    config = {"plugin_locations": [str(plugin_dir)], "plugin_options": {"default": {
        "restart": "always", "max_restarts": 0, "timeout": 3600, "stop_timeout": 1,
        "backoff": {"initial": 0.05, "max": 0.05}}}}
    launcher = start(PluginLauncher(config, ROLE), launchers)
    wait_for(lambda: len(read_pids(runs)) >= 25, 30, message="25 runs")
    supervisor = launcher._supervisor
    assert supervisor is not None
    pending = supervisor.call(lambda: len(supervisor._timers))
    assert pending <= 5, f"{pending} timers pending after {len(read_pids(runs))} runs"


def test_a_repeating_loop_error_is_logged_once_and_backs_off(
    plugin_dir: Path, launchers: list[PluginLauncher], tracker: ProcessTracker, logs: LogRecorder,
) -> None:
    write_plugin(plugin_dir, "all_a.sh", SLEEPER)
    launcher = start(PluginLauncher({"plugin_locations": [str(plugin_dir)]}, ROLE), launchers)
    pid = wait_running(launcher, "all_a.sh", tracker)
    supervisor = launcher._supervisor
    assert supervisor is not None
    calls: list[float] = []
    read_end, write_end = os.pipe()
    os.write(write_end, b"x")  # stays readable: the failing handler runs every round

    def broken() -> None:
        calls.append(time.monotonic())
        raise RuntimeError("broken handler")

    try:
        supervisor.call(lambda: supervisor.add_reader(read_end, broken))
        time.sleep(1.5)  # on purpose: the window in which a spinning loop would fail thousands
        failures = len(calls)
        assert 3 <= failures <= 15, f"{failures} failing rounds in 1.5 s"
        assert len(logs.having("internal error in the plugin supervisor loop")) == 1
        os.read(read_end, 1)  # the cause goes away (nothing left to read): the loop recovers
        wait_for(lambda: logs.having("the previous internal error repeated"), 5,
                 message="the count of repeats")
        supervisor.call(lambda: supervisor._selector.unregister(read_end))
    finally:
        os.close(read_end)
        os.close(write_end)
    assert running_pid(launcher, "all_a.sh") == pid  # supervision went on


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("depth", [500, 100_000])
def test_deeply_nested_yaml_is_one_error_line(tmp_path: Path, depth: int) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("extra_config: {a: " + "[" * depth + "]" * depth + "}\n")
    line = usage_error(cli("list", "--role", ROLE, "--config", str(path)))
    assert line == f"error: {path}: configuration is nested more than 100 levels deep"


@pytest.mark.parametrize("depth", [2_000, 100_000])
def test_deeply_nested_mapping_is_a_config_error(depth: int) -> None:
    deep: Any = []
    for _ in range(depth):
        deep = [deep]
    with pytest.raises(ConfigError) as info:
        from_mapping({"extra_config": {"x": deep}}, "host.yaml")
    assert str(info.value) == "host.yaml: configuration is nested more than 100 levels deep"
    with pytest.raises(ConfigError):
        PluginLauncher({"x": deep}, ROLE)


def test_relative_location_survives_a_chdir_of_the_host(
    tmp_path: Path, launchers: list[PluginLauncher], monkeypatch: pytest.MonkeyPatch,
) -> None:
    plugins = safe_dir(tmp_path / "plugins")
    runs = tmp_path / "runs"
    write_plugin(plugins, "all_tick.sh", f"#!/bin/sh\necho $$ >> {runs}\nsleep 0.1\nexit 1\n")
    monkeypatch.chdir(tmp_path)
    config = {"plugin_locations": ["plugins"], "plugin_options": {"default": {
        "restart": "on-failure", "max_restarts": 0, "backoff": {"initial": 0.05, "max": 0.05}}}}
    launcher = start(PluginLauncher(config, ROLE), launchers)
    wait_for(lambda: read_pids(runs), 10, message="the first run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the host moves; restarts must still find the file
    before = len(read_pids(runs))
    wait_for(lambda: len(read_pids(runs)) >= before + 3, 10, message="three restarts after chdir")
    assert status_of(launcher, "all_tick.sh")["path"] == str(plugins / "all_tick.sh")


# ------------------------------------------------------------- bad files named like plugins


def drop_caps_prefix(tmp_path: Path) -> list[str]:
    """Root reads everything: run the CLI without CAP_DAC_* so mode 000 means EACCES."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs setpriv to make a file unreadable for root")
    prefix = [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]
    if subprocess.run([*prefix, "ls", str(tmp_path / "locked")],
                      capture_output=True).returncode == 0:
        pytest.skip("cannot make a folder unreadable here")
    return prefix


def make_bad_files(plugin_dir: Path, tmp_path: Path) -> list[socket.socket]:
    """A symlink loop, a dangling link, a link into a folder we may not search (EACCES), a FIFO,
    a socket, and a link to a file whose read fails (EIO): all named like plugins."""
    os.symlink("all_loop.py", plugin_dir / "all_loop.py")
    os.symlink(tmp_path / "gone.sh", plugin_dir / "all_dangling.sh")
    locked = tmp_path / "locked"
    locked.mkdir()
    write_plugin(locked, "all_secret.sh", "#!/bin/sh\necho secret\n")
    locked.chmod(0)
    os.symlink(locked / "all_secret.sh", plugin_dir / "all_secret.sh")
    os.mkfifo(plugin_dir / "all_fifo.py")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(plugin_dir / "all_sock.sh"))
    os.symlink("/proc/self/mem", plugin_dir / "all_mem.py")
    return [sock]


@pytest.mark.parametrize("action", ["list", "run"])
def test_bad_files_named_like_plugins_are_one_line_each(
    plugin_dir: Path, tmp_path: Path, tracker: ProcessTracker, action: str,
) -> None:
    write_plugin(plugin_dir, "all_ok.sh", "#!/bin/sh\necho ok\n")
    held = make_bad_files(plugin_dir, tmp_path)
    try:
        prefix = drop_caps_prefix(tmp_path)
        result = subprocess.run(
            [*prefix, *CLI, action, "--role", ROLE, "--plugin-location", str(plugin_dir),
             *(["--stop-timeout", "1"] if action == "run" else [])],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    finally:
        for sock in held:
            sock.close()
        (tmp_path / "locked").chmod(0o755)
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    both = result.stdout + result.stderr
    for name in ("all_loop.py", "all_dangling.sh", "all_fifo.py", "all_sock.sh", "all_mem.py"):
        assert name in both, f"{name} is not named:\n{both}"
    assert "Too many levels of symbolic links" in both
    assert "all_fifo.py: not a regular file (FIFO), skipped" in result.stderr
    assert "all_sock.sh: not a regular file (socket), skipped" in result.stderr
    if prefix:
        assert "all_secret.sh: cannot check permissions: Permission denied" in both
    if action == "list":
        assert result.returncode == 0, result.stderr
        assert re.search(r"^run\s+all_ok\.sh\s", result.stdout, re.M), result.stdout
    else:
        assert "[all_ok.sh] ok" in result.stdout.splitlines()
        assert "plugin all_mem.py cannot run" in result.stderr


def test_reload_keeps_running_plugins_when_a_file_turns_bad(
    plugin_dir: Path, tmp_path: Path, launchers: list[PluginLauncher], tracker: ProcessTracker,
    logs: LogRecorder,
) -> None:
    write_plugin(plugin_dir, "all_a.sh", SLEEPER)
    launcher = start(PluginLauncher({"plugin_locations": [str(plugin_dir)]}, ROLE), launchers)
    pid = wait_running(launcher, "all_a.sh", tracker)
    held = make_bad_files(plugin_dir, tmp_path)
    try:
        changes = launcher.reload()
    finally:
        for sock in held:
            sock.close()
        (tmp_path / "locked").chmod(0o755)
    assert changes["stopped"] == [] and changes["restarted"] == []
    assert running_pid(launcher, "all_a.sh") == pid
    assert logs.having("all_loop.py", "Too many levels of symbolic links")


def test_sighup_with_a_bad_file_keeps_the_plugins_running(
    plugin_dir: Path, tmp_path: Path, tracker: ProcessTracker,
) -> None:
    write_plugin(plugin_dir, "all_a.sh", SLEEPER)
    out_path, err_path = tmp_path / "out", tmp_path / "err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = tracker.popen([*CLI, "run", "--role", ROLE, "--plugin-location", str(plugin_dir),
                              "--stop-timeout", "1"],
                             stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    found = wait_for(lambda: re.search(rb"started (\d+)", out_path.read_bytes()), 10,
                     message="the plugin's first line")
    pid = int(found.group(1))
    tracker.add(pid)
    os.symlink("all_loop.py", plugin_dir / "all_loop.py")
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: b"all_loop.py" in err_path.read_bytes(), 10, message="the bad file named")
    assert proc.poll() is None and alive(pid), err_path.read_text()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    wait_gone([pid])
    assert b"Traceback" not in err_path.read_bytes()


def test_watch_keeps_starting_plugins_after_a_bad_file_appears(
    plugin_dir: Path, launchers: list[PluginLauncher], tracker: ProcessTracker,
) -> None:
    write_plugin(plugin_dir, "all_a.sh", SLEEPER)
    launcher = start(PluginLauncher({"plugin_locations": [str(plugin_dir)]}, ROLE), launchers)
    launcher.watch()
    wait_running(launcher, "all_a.sh", tracker)
    os.symlink("all_loop.py", plugin_dir / "all_loop.py")
    os.symlink("/nonexistent", plugin_dir / "all_dangling.sh")
    write_plugin(plugin_dir, "all_new.sh", SLEEPER)
    wait_running(launcher, "all_new.sh", tracker, timeout=10)


# ------------------------------------------------------------------- folders that come back


@pytest.mark.parametrize("which", ["subfolder", "location root"])
def test_deleted_and_recreated_folder_is_watched_again(
    plugin_dir: Path, launchers: list[PluginLauncher], tracker: ProcessTracker, which: str,
) -> None:
    folder = plugin_dir / "sub" if which == "subfolder" else plugin_dir
    write_plugin(safe_dir(folder), "all_old.sh", SLEEPER)
    launcher = start(PluginLauncher({"plugin_locations": [str(plugin_dir)],
                                     "plugin_options": {"default": {"stop_timeout": 1}}},
                                    ROLE), launchers)
    launcher.watch()
    prefix = "sub/" if which == "subfolder" else ""
    old = wait_running(launcher, f"{prefix}all_old.sh", tracker)

    shutil.rmtree(folder)
    wait_gone([old])
    safe_dir(folder)
    write_plugin(folder, "all_first.sh", SLEEPER)
    wait_running(launcher, f"{prefix}all_first.sh", tracker, timeout=10)
    # the reload that found all_first.sh has come and gone: only the new watch sees this one
    write_plugin(folder, "all_second.sh", SLEEPER)
    wait_running(launcher, f"{prefix}all_second.sh", tracker, timeout=5)


# -------------------------------------------------------------------------- untrusted text

ESC_NAME = "all_a\x1b]0;TITLE\x07.sh"
NL_NAME = "all_b\nERROR forged (pid 1).sh"


def test_safe_text_escapes_every_control_character() -> None:
    assert safe_text("a\x1b[2Jb\tc\nd\re\x00f\x7fg\x85h\u2028i\u2029j") == \
        "a\\x1b[2Jb\tc\\nd\\re\\x00f\\x7fg\\x85h\\u2028i\\u2029j"
    assert safe_text("plain ünïcödé \\ text") == "plain ünïcödé \\ text"


def test_control_characters_in_names_never_reach_stderr_raw(
    plugin_dir: Path, tmp_path: Path,
) -> None:
    write_plugin(plugin_dir, ESC_NAME, "#!/bin/sh\necho one\n")
    write_plugin(plugin_dir, NL_NAME, "#!/bin/sh\necho two\n")
    result = subprocess.run([*CLI, "run", "--role", ROLE, "--plugin-location", str(plugin_dir),
                             "--stop-timeout", "1"], capture_output=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    for stream in (result.stdout, result.stderr):
        assert b"\x1b" not in stream and b"\x07" not in stream
    for line in result.stderr.splitlines():
        assert LOG_LINE.match(line), line  # no forged line
    assert b"started plugin all_b\\nERROR forged (pid 1).sh (pid " in result.stderr
    assert sorted(result.stdout.splitlines()) == [
        b"[all_a\\x1b]0;TITLE\\x07.sh] one", b"[all_b\\nERROR forged (pid 1).sh] two"]
    listing = cli("list", "--role", ROLE, "--plugin-location", str(plugin_dir))
    assert "\x1b" not in listing.stdout
    assert [line.split()[1] for line in listing.stdout.splitlines()[:2]] == [
        "all_a\\x1b]0;TITLE\\x07.sh", "all_b\\nERROR"]
    names = {d["name"] for d in json.loads(
        cli("list", "--json", "--role", ROLE, "--plugin-location", str(plugin_dir)).stdout)}
    assert names == {ESC_NAME, NL_NAME}  # JSON keeps the exact names


def test_plugin_output_to_a_terminal_is_escaped(plugin_dir: Path, tracker: ProcessTracker) -> None:
    write_plugin(plugin_dir, "all_evil.sh",
                 "#!/bin/sh\nprintf 'title \\033]0;PWNED\\007 clear \\033[2J end\\n'\n"
                 "printf 'next\\342\\200\\250line\\n'\necho done\n")
    master, slave = pty.openpty()
    try:
        proc = tracker.popen([*CLI, "run", "--role", ROLE, "--plugin-location", str(plugin_dir),
                              "--stop-timeout", "1"], stdout=slave, stderr=subprocess.DEVNULL,
                             stdin=subprocess.DEVNULL)
        os.close(slave)
        data = b""
        deadline = time.monotonic() + 15
        while b"done" not in data and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    data += os.read(master, 65536)
                except OSError:  # EIO: the terminal's other side is closed
                    break
        assert proc.wait(timeout=15) == 0
    finally:
        os.close(master)
    assert b"done" in data, data
    assert b"\x1b" not in data and b"\x07" not in data, data
    assert b"[all_evil.sh] title \\x1b]0;PWNED\\x07 clear \\x1b[2J end" in data
    assert b"[all_evil.sh] next\\u2028line" in data


def test_logged_plugin_lines_are_escaped(
    plugin_dir: Path, launchers: list[PluginLauncher], logs: LogRecorder,
) -> None:
    write_plugin(plugin_dir, "all_evil.sh",
                 "#!/bin/sh\nprintf 'a\\033[31mb\\rc\\n'\nprintf 'x\\342\\200\\250y\\n'\n")
    launcher = start(PluginLauncher({"plugin_locations": [str(plugin_dir)]}, ROLE), launchers)
    launcher.wait(10)
    wait_for(lambda: len(logs.output("all_evil.sh")) == 2, message="two lines")
    assert logs.output("all_evil.sh") == ["a\\x1b[31mb\\rc", "x\\u2028y"]


def test_stream_sink_to_a_pipe_keeps_bytes_as_they_are() -> None:
    read_end, write_end = os.pipe()
    try:
        StreamSink(write_end).write("all_x\x1b.sh", "stdout", b"raw \x1b[2J\rline\n")
        assert os.read(read_end, 4096) == b"[all_x\\x1b.sh] raw \x1b[2J\rline\n"
    finally:
        os.close(read_end)
        os.close(write_end)


# --------------------------------------------------------------------------- status server


def fetch(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
        return response.status, response.read()


def run_with_status(plugin_dir: Path, tmp_path: Path,
                    tracker: ProcessTracker) -> tuple[subprocess.Popen[bytes], int]:
    err_path = tmp_path / "err"
    with open(err_path, "wb") as err:
        proc = tracker.popen([*CLI, "run", "--role", ROLE, "--plugin-location", str(plugin_dir),
                              "--stop-timeout", "1", "--status-addr", "127.0.0.1:0"],
                             stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
    found = wait_for(lambda: SERVING.search(err_path.read_text(errors="replace")), 15,
                     message="the status address")
    return proc, int(found.group(1))


def stop_cli(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


def test_status_answers_while_an_idle_client_hangs(
    plugin_dir: Path, tmp_path: Path, tracker: ProcessTracker,
) -> None:
    write_plugin(plugin_dir, "all_a.sh", SLEEPER)
    proc, port = run_with_status(plugin_dir, tmp_path, tracker)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    idle[1].sendall(b"GET /sta")  # and one that stops half-way through its request
    try:
        started = time.monotonic()
        code, body = fetch(port, "/status", timeout=1.0)
        assert code == 200 and time.monotonic() - started < 1.0
        assert [e["name"] for e in json.loads(body)] == ["all_a.sh"]
        code, body = fetch(port, "/metrics", timeout=1.0)
        assert code == 200 and b'plugin_up{plugin="all_a.sh"}' in body
    finally:
        for sock in idle:
            sock.close()
    stop_cli(proc)


def test_non_utf8_plugin_name_in_status_and_metrics(
    plugin_dir: Path, tmp_path: Path, tracker: ProcessTracker,
) -> None:
    name = os.fsdecode(b"all_\xff\xfe.sh")
    write_plugin(plugin_dir, name, SLEEPER)
    write_plugin(plugin_dir, "all_plain.sh", SLEEPER)
    proc, port = run_with_status(plugin_dir, tmp_path, tracker)
    code, body = fetch(port, "/metrics")
    assert code == 200
    text = body.decode("utf-8")
    assert 'plugin_up{plugin="all_\\\\xff\\\\xfe.sh"}' in text, text
    assert 'plugin_up{plugin="all_plain.sh"}' in text
    code, body = fetch(port, "/status")
    assert code == 200
    names = {e["name"] for e in json.loads(body)}
    assert names == {name, "all_plain.sh"}  # JSON escapes: the exact name comes back
    stop_cli(proc)


def test_a_thousand_quick_connections_are_all_answered() -> None:
    entries = [{"name": "all_x.sh", "state": "running", "restarts": 0, "output_lines": 3}]
    server = serve_status(lambda: entries, "127.0.0.1", 0)
    port = server.server_address[1]
    clients: list[socket.socket] = []
    deadline = time.monotonic() + 30
    try:
        for _ in range(1000):  # loopback only; each sends its request at once
            assert time.monotonic() < deadline, f"only {len(clients)} connected"
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /status HTTP/1.0\r\n\r\n")
            clients.append(sock)
        answered = 0
        for sock in clients:
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            answered += data.startswith(b"HTTP/1.0 200") and b"all_x.sh" in data
        assert answered == 1000
    finally:
        for sock in clients:
            sock.close()
        server.server_close()


def test_status_never_waits_for_a_busy_supervisor(
    plugin_dir: Path, launchers: list[PluginLauncher], tracker: ProcessTracker,
) -> None:
    write_plugin(plugin_dir, "all_a.sh", SLEEPER)
    launcher = start(PluginLauncher({"plugin_locations": [str(plugin_dir)]}, ROLE), launchers)
    pid = wait_running(launcher, "all_a.sh", tracker)
    # the snapshot trails the state by up to 0.2 s (starting -> running): let it catch up
    wait_for(lambda: launcher.status_snapshot()[0]["state"] == "running", 5, message="snapshot")
    server = serve_status(launcher.status_snapshot, "127.0.0.1", 0)
    supervisor = launcher._supervisor
    assert supervisor is not None
    release = threading.Event()
    busy = threading.Thread(target=lambda: supervisor.call(lambda: release.wait(10)))
    busy.start()
    try:
        code, body = fetch(server.server_address[1], "/status", timeout=1.0)
        assert code == 200
        assert [(e["name"], e["pid"], e["state"]) for e in json.loads(body)] == [
            ("all_a.sh", pid, "running")]
    finally:
        release.set()
        busy.join()
        server.server_close()
