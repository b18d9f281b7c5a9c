"""``run --control`` and ``plugin-launcher ctl`` end to end (real launcher, real plugins, real
signals), and the same operations through the Python API."""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import (
    CLI,
    PYTHON,
    ProcessTracker,
    alive,
    safe_dir,
    start,
    wait_for,
    wait_gone,
    wait_running,
    write_plugin,
)

from plugin_launcher import PluginLauncher
from plugin_launcher.control import default_path
from plugin_launcher.folders import folder_problem
from plugin_launcher.launcher import OperationError, UnknownPluginError, parse_signal

# Prints a greeting with its PID, then one line per SIGUSR1 (what `signal` and `tail -f` see).
ECHO = """\
import os, signal
signal.signal(signal.SIGUSR1, lambda *_: print("got USR1", flush=True))
print(f"hello from {os.getpid()}", flush=True)
while True:
    signal.pause()
"""
QUIET = "import time\nprint('quiet here', flush=True)\nwhile True:\n    time.sleep(1000)\n"
ENV = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}


def ctl(sock: Path | str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "ctl", "--control", str(sock), *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV, stdin=subprocess.DEVNULL)


def status(sock: Path) -> dict[str, dict[str, object]]:
    result = ctl(sock, "status", "--json")
    assert result.returncode == 0, result.stderr
    return {p["name"]: p for p in json.loads(result.stdout)["plugins"]}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path (a Unix socket path has at most 107 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="plctl-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Running:
    sock: Path
    folder: Path
    proc: subprocess.Popen[str]

    def pid(self, name: str) -> int:
        entry = status(self.sock)[name]
        assert entry["state"] == "running", entry
        return int(entry["pid"])  # type: ignore[call-overload]


def launch(folder: Path, sock: Path, tracker: ProcessTracker) -> Running:
    proc = tracker.popen([*CLI, "run", "--role", "worker", "--plugin-location", str(folder),
                          "--control", str(sock), "--stop-timeout", "2"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                         stdin=subprocess.DEVNULL)
    running = Running(sock, folder, proc)

    def ready() -> bool:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        if not sock.exists():
            return False
        result = ctl(sock, "status", "--json")
        if result.returncode != 0:
            return False
        plugins = json.loads(result.stdout)["plugins"]
        return bool(plugins) and all(p["state"] == "running" for p in plugins)

    wait_for(ready, 20, interval=0.1, message="the launcher and its plugins to run")
    for entry in status(sock).values():
        tracker.add(int(entry["pid"]))  # type: ignore[call-overload]
    return running


@pytest.fixture
def launcher_run(plugin_dir: Path, tmp_path: Path, tracker: ProcessTracker) -> Iterator[Running]:
    write_plugin(plugin_dir, "all_echo.py", ECHO, 0o644)
    write_plugin(plugin_dir, "all_quiet.py", QUIET, 0o644)
    running = launch(plugin_dir, tmp_path / "ctl.sock", tracker)
    yield running
    running.proc.send_signal(signal.SIGTERM)
    assert running.proc.wait(timeout=20) == 0
    assert running.proc.stderr is not None
    running.proc.stderr.close()
    assert not running.sock.exists(), "the socket file is removed when run ends"


# --------------------------------------------------------------------------------- ctl, CLI
def test_status_lists_every_plugin_with_state_pid_and_restarts(launcher_run: Running) -> None:
    result = ctl(launcher_run.sock, "status")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert set(rows) == {"all_echo.py", "all_quiet.py"}
    assert rows["all_echo.py"][1:4] == ["running", str(launcher_run.pid("all_echo.py")), "0"]


def test_restart_changes_the_pid_and_counts(launcher_run: Running) -> None:
    old = launcher_run.pid("all_echo.py")
    result = ctl(launcher_run.sock, "restart", "all_echo.py")
    assert result.returncode == 0, result.stderr
    new = launcher_run.pid("all_echo.py")
    assert new != old and not alive(old)
    assert f"pid {new}, restarts 1" in result.stdout
    assert status(launcher_run.sock)["all_echo.py"]["restarts"] == 1
    assert status(launcher_run.sock)["all_quiet.py"]["restarts"] == 0  # the other one untouched
    assert ctl(launcher_run.sock, "restart", "all_echo.py").returncode == 0
    assert status(launcher_run.sock)["all_echo.py"]["restarts"] == 2


def test_stop_persists_across_reload_until_start(launcher_run: Running) -> None:
    pid = launcher_run.pid("all_echo.py")
    result = ctl(launcher_run.sock, "stop", "all_echo.py")
    assert result.returncode == 0, result.stderr
    assert "all_echo.py: stopped" in result.stdout
    assert not alive(pid), "stop returns once the plugin is gone"
    # A reload, even with the plugin's file changed, must not start what the operator stopped.
    path = launcher_run.folder / "all_echo.py"
    path.write_text(ECHO + "# changed\n")
    old = time.time() - 10
    os.utime(path, (old, old))
    reload = ctl(launcher_run.sock, "reload")
    assert reload.returncode == 0, reload.stderr
    assert reload.stdout.startswith("reloaded:")
    assert status(launcher_run.sock)["all_echo.py"]["state"] == "stopped"
    assert launcher_run.proc.poll() is None, "run stays up with every plugin it may restart"
    started = ctl(launcher_run.sock, "start", "all_echo.py")
    assert started.returncode == 0, started.stderr
    new = launcher_run.pid("all_echo.py")
    assert new != pid and f"running (pid {new}" in started.stdout
    # start of a running plugin is a no-op, not an error: scripts can call it blindly
    assert ctl(launcher_run.sock, "start", "all_echo.py").returncode == 0
    assert launcher_run.pid("all_echo.py") == new


def test_signal_tail_and_tail_follow(launcher_run: Running) -> None:
    pid = launcher_run.pid("all_echo.py")
    follower = subprocess.Popen([*CLI, "ctl", "--control", str(launcher_run.sock), "tail",
                                 "all_echo.py", "-n", "1", "-f"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == f"hello from {pid}\n"  # the -n 1 backlog
        sent = ctl(launcher_run.sock, "signal", "all_echo.py", "USR1")
        assert sent.returncode == 0, sent.stderr
        assert f"pid {pid}" in sent.stdout
        ready, _, _ = select.select([follower.stdout], [], [], 10)
        assert ready, "tail -f did not show the new line"
        assert follower.stdout.readline() == "got USR1\n"
        assert ctl(launcher_run.sock, "signal", "all_echo.py", "SIGUSR1").returncode == 0
        assert ctl(launcher_run.sock, "signal", "all_echo.py",
                   str(int(signal.SIGUSR1))).returncode == 0
        expected = f"hello from {pid}\n" + "got USR1\n" * 3
        wait_for(lambda: ctl(launcher_run.sock, "tail", "all_echo.py", "-n", "4").stdout
                 == expected, message="the greeting and three USR1 lines in tail")
        two = ctl(launcher_run.sock, "tail", "all_echo.py", "-n", "2")
        assert two.returncode == 0 and two.stdout == "got USR1\ngot USR1\n"
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(timeout=10)
        for pipe in (follower.stdout, follower.stderr):
            if pipe is not None:
                pipe.close()
    assert launcher_run.pid("all_echo.py") == pid, "signals are not restarts"


def test_tail_follow_ends_when_the_launcher_stops(plugin_dir: Path, tmp_path: Path,
                                                  tracker: ProcessTracker) -> None:
    write_plugin(plugin_dir, "all_quiet.py", QUIET, 0o644)
    running = launch(plugin_dir, tmp_path / "c.sock", tracker)
    follower = tracker.popen([*CLI, "ctl", "--control", str(running.sock), "tail",
                              "all_quiet.py", "-f"], stdout=subprocess.PIPE, text=True, env=ENV)
    assert follower.stdout is not None
    assert follower.stdout.readline() == "quiet here\n"
    running.proc.send_signal(signal.SIGTERM)
    assert follower.wait(timeout=15) == 0
    assert running.proc.wait(timeout=15) == 0


def test_a_stopped_tail_follower_costs_the_launcher_bounded_memory(
        plugin_dir: Path, tmp_path: Path, tracker: ProcessTracker) -> None:
    """`ctl tail -f` on a flooding plugin, then the client is stopped (SIGSTOP): what waits for
    it is bounded by bytes (4 MiB), not by blocks (before: 4096 blocks of up to 64 KiB, so up
    to 256 MiB per follower and 16 followers)."""
    import psutil

    write_plugin(plugin_dir, "all_flood.py", "import sys\nline = b'x' * 30000 + b'\\n'\n"
                 "while True:\n    sys.stdout.buffer.write(line * 2)\n", 0o644)
    running = launch(plugin_dir, tmp_path / "c.sock", tracker)
    host = psutil.Process(running.proc.pid)
    follower = tracker.popen([*CLI, "ctl", "--control", str(running.sock), "tail",
                              "all_flood.py", "-f"], stdout=subprocess.PIPE, env=ENV)
    assert follower.stdout is not None
    follower.stdout.readline()  # it follows
    before = host.memory_info().rss
    follower.send_signal(signal.SIGSTOP)
    try:
        peak = before
        deadline = time.monotonic() + 4.0  # within CLIENT_TIMEOUT: the handler is still there
        while time.monotonic() < deadline:
            peak = max(peak, host.memory_info().rss)
            time.sleep(0.05)
        assert peak - before < 48 << 20, f"RSS grew by {(peak - before) >> 20} MiB"
        assert running.proc.poll() is None
    finally:
        follower.send_signal(signal.SIGCONT)
        follower.kill()
        follower.wait(timeout=10)
        follower.stdout.close()
    running.proc.send_signal(signal.SIGTERM)
    assert running.proc.wait(timeout=20) == 0


def test_errors_unknown_plugin_bad_signal_and_usage(launcher_run: Running) -> None:
    result = ctl(launcher_run.sock, "restart", "all_ecoh.py")
    assert result.returncode == 1
    assert result.stderr == "error: no plugin named 'all_ecoh.py' (did you mean 'all_echo.py'?)\n"
    far = ctl(launcher_run.sock, "stop", "zzz")
    assert (far.returncode, far.stderr) == (1, "error: no plugin named 'zzz'\n")
    bad = ctl(launcher_run.sock, "signal", "all_echo.py", "NOPE")
    assert bad.returncode == 1 and bad.stderr.startswith("error: unknown signal 'NOPE'")
    usage = ctl(launcher_run.sock, "tail")
    assert usage.returncode == 2 and usage.stderr.startswith("error:")
    assert ctl(launcher_run.sock, "frobnicate").returncode == 2
    stopped = ctl(launcher_run.sock, "stop", "all_quiet.py")
    assert stopped.returncode == 0
    not_running = ctl(launcher_run.sock, "signal", "all_quiet.py", "HUP")
    assert not_running.returncode == 1
    assert not_running.stderr == "error: plugin all_quiet.py is not running (state stopped)\n"


def test_no_launcher_exits_3(tmp_path: Path) -> None:
    result = ctl(tmp_path / "none.sock", "status")
    assert result.returncode == 3
    assert result.stderr.startswith("error: cannot connect to the launcher at ")
    assert len(result.stderr.splitlines()) == 1
    # a socket file nobody listens on (a launcher killed with SIGKILL) is the same case
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    assert ctl(stale, "status").returncode == 3


def test_stale_socket_replaced_live_one_refused(plugin_dir: Path, tmp_path: Path,
                                                tracker: ProcessTracker) -> None:
    write_plugin(plugin_dir, "all_quiet.py", QUIET, 0o644)
    sock = tmp_path / "c.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock))  # stale: bound, nobody listening
    running = launch(plugin_dir, sock, tracker)
    second = subprocess.run([*CLI, "run", "--role", "worker", "--plugin-location",
                             str(plugin_dir), "--control", str(sock)], capture_output=True,
                            text=True, env=ENV, timeout=30, stdin=subprocess.DEVNULL)
    assert second.returncode == 2
    assert f"another launcher is already listening on {sock}" in second.stderr
    assert status(sock)["all_quiet.py"]["state"] == "running", "the first one is untouched"
    running.proc.send_signal(signal.SIGTERM)
    assert running.proc.wait(timeout=15) == 0


def test_default_path_and_folder_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_path("WORKER", 3) == str(tmp_path / "plugin-launcher" / "worker-3.sock")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_path("SCHEDULER", 0) == f"/tmp/plugin-launcher-{os.getuid()}/scheduler-0.sock"
    st = os.stat(tmp_path)
    uid = os.getuid()
    safe = os.stat_result((stat.S_IFDIR | 0o700, *st[1:4], uid, *st[5:]))
    assert folder_problem(safe, uid) is None
    shared = os.stat_result((stat.S_IFDIR | 0o777, *st[1:]))
    assert "writable by group or others" in (folder_problem(shared, st.st_uid) or "")
    assert "owned by uid" in (folder_problem(safe, uid + 1) or "")


def test_default_path_from_role_with_private_folder(plugin_dir: Path, tracker: ProcessTracker,
                                                    short_dir: Path) -> None:
    runtime = safe_dir(short_dir / "runtime")
    env = {**ENV, "XDG_RUNTIME_DIR": str(runtime)}
    write_plugin(plugin_dir, "all_quiet.py", QUIET, 0o644)
    proc = tracker.popen([*CLI, "run", "--role", "worker", "--worker-id", "2", "--worker-count",
                          "3", "--plugin-location", str(plugin_dir), "--control"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    sock = runtime / "plugin-launcher" / "worker-2.sock"

    def ctl_env(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, "ctl", *args], capture_output=True, text=True, env=env,
                              timeout=30, stdin=subprocess.DEVNULL)

    wait_for(lambda: ctl_env("--role", "worker", "--worker-id", "2", "status").returncode == 0,
             20, interval=0.1, message="the default control socket")
    assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o600
    only = ctl_env("status")  # the only socket in the folder needs no option at all
    assert only.returncode == 0 and "all_quiet.py" in only.stdout
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    # a folder others may write to is refused (someone could plant a socket there)
    (runtime / "plugin-launcher").chmod(0o777)
    refused = subprocess.run([*CLI, "run", "--role", "worker", "--plugin-location",
                              str(plugin_dir), "--control", "auto"], capture_output=True,
                             text=True, env=env, timeout=30, stdin=subprocess.DEVNULL)
    assert refused.returncode == 2
    assert "writable by group or others" in refused.stderr


NOBODY = 65534
PEER_SCRIPT = """\
import json, os, socket, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"connect": exc.errno})); sys.exit(0)
try:
    s.sendall(b'{"op": "status"}\\n')
except OSError:
    pass  # refused before reading: the reply is waiting all the same
print(json.dumps({"reply": s.makefile().readline()}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as user nobody")
def test_socket_is_0600_and_another_user_is_refused(plugin_dir: Path, tracker: ProcessTracker,
                                                    short_dir: Path) -> None:
    # A folder every user can traverse, so only the socket's own protection stands in the way.
    short_dir.chmod(0o755)
    write_plugin(plugin_dir, "all_quiet.py", QUIET, 0o644)
    running = launch(plugin_dir, short_dir / "c.sock", tracker)
    assert stat.S_IMODE(os.lstat(running.sock).st_mode) == 0o600
    assert os.lstat(running.sock).st_uid == os.getuid()

    def as_nobody() -> dict[str, object]:
        result = subprocess.run([PYTHON, "-c", PEER_SCRIPT, str(running.sock)],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    assert as_nobody() == {"connect": errno.EACCES}  # mode 0600: the kernel says no
    running.sock.chmod(0o666)  # an operator's mistake: SO_PEERCRED still says no
    reply = json.loads(str(as_nobody()["reply"]))
    assert reply == {"ok": False,
                     "error": f"permission denied: uid {NOBODY} may not control this launcher"}
    assert status(running.sock)["all_quiet.py"]["state"] == "running"
    running.proc.send_signal(signal.SIGTERM)
    assert running.proc.wait(timeout=15) == 0


# --------------------------------------------------------------------------------- Python API
def test_api_restart_stop_start_signal_tail(plugin_dir: Path, tracker: ProcessTracker,
                                            launchers: list[PluginLauncher]) -> None:
    write_plugin(plugin_dir, "all_echo.py", ECHO, 0o644)
    launcher = PluginLauncher({"plugin_locations": [str(plugin_dir)]}, "worker", worker_id=0,
                              worker_count=1, settle_time=0.1)
    start(launcher, launchers)
    pid = wait_running(launcher, "all_echo.py", tracker)
    wait_for(lambda: launcher.tail("all_echo.py") == [f"hello from {pid}"], message="greeting")
    assert launcher.signal_plugin("all_echo.py", "USR1") == pid
    wait_for(lambda: launcher.tail("all_echo.py", 1) == ["got USR1"], message="USR1 line")

    entry = launcher.restart_plugin("all_echo.py")
    assert entry["state"] == "running" and entry["pid"] != pid and entry["restarts"] == 1
    wait_gone([pid])
    new = wait_running(launcher, "all_echo.py", tracker)
    wait_for(lambda: launcher.tail("all_echo.py", 1) == [f"hello from {new}"], message="hello")

    stopped = launcher.stop_plugin("all_echo.py", timeout=1.0)
    assert stopped["state"] == "stopped" and not alive(new)
    launcher.reload()
    assert launcher.status()[0]["state"] == "stopped", "reload must not start it"
    with pytest.raises(OperationError, match="not running"):
        launcher.signal_plugin("all_echo.py", signal.SIGUSR1)
    again = launcher.start_plugin("all_echo.py")
    assert again["state"] == "running" and again["restarts"] == 1  # a start is not a restart
    tracker.add(int(again["pid"]))
    third = f"hello from {again['pid']}"
    wait_for(lambda: launcher.tail("all_echo.py", 1) == [third], message="third greeting")

    with pytest.raises(KeyError, match=r"no plugin named 'all_ech\.py' \(did you mean"):
        launcher.stop_plugin("all_ech.py")
    with pytest.raises(UnknownPluginError):
        launcher.tail("nothing")
    launcher.stop_plugins(timeout=1.0)
    assert launcher.tail("all_echo.py", 3) == ["got USR1", f"hello from {new}", third], \
        "the last lines are kept after a stop"


@pytest.mark.parametrize(("given", "number"), [
    ("TERM", signal.SIGTERM), ("sighup", signal.SIGHUP), ("SIGUSR1", signal.SIGUSR1),
    ("9", 9), (15, 15), (signal.SIGINT, signal.SIGINT)])
def test_parse_signal(given: object, number: int) -> None:
    assert parse_signal(given) == number


@pytest.mark.parametrize("given", ["NOPE", "0", 0, 999, "", None, True, "SIG"])
def test_parse_signal_rejects(given: object) -> None:
    with pytest.raises(ValueError):
        parse_signal(given)
