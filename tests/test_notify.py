"""sd_notify: parsing, attribution by kernel credentials, the socket with real senders (the
``sdnotify`` package, ``systemd-notify``, raw datagrams), and readiness/watchdog in a launcher."""

from __future__ import annotations

import json
import os
import selectors
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import PYTHON, wait_for

from plugin_launcher.notify import (
    MAX_DATAGRAM,
    Notice,
    NotifySocket,
    Readiness,
    owner_of,
    parse_notice,
    plugin_variables,
    stat_ids,
)
from plugin_launcher.options import OptionError, PluginOptions, parse_options


# ---------------------------------------------------------------------------------- options
def test_ready_and_watchdog_options() -> None:
    table = parse_options({"default": {"ready": "notify", "ready_timeout": 20},
                           "all_x.py": {"watchdog": 2.5, "ready": None}})
    assert (table.default.ready, table.default.ready_timeout) == ("notify", 20.0)
    assert table.for_plugin("all_x.py").ready is None
    assert table.for_plugin("all_x.py").watchdog == 2.5
    assert (PluginOptions().ready, PluginOptions().ready_timeout) == (None, 90.0)


@pytest.mark.parametrize(("entry", "message"), [
    ({"ready": "yes"}, "plugin_options.default.ready: expected notify or null, got 'yes'"),
    ({"ready": True}, "plugin_options.default.ready: expected notify or null, got True"),
    ({"ready_timeout": 0}, "plugin_options.default.ready_timeout: must be between 0.1 and "
                           "2592000 seconds (30 days), got 0"),
    ({"ready_timeout": None}, "ready_timeout: expected a number, got None"),
    ({"watchdog": float("inf")}, "plugin_options.default.watchdog: must be between 0.1 and "
                                 "2592000 seconds (30 days), got inf"),
    ({"watchdog": "5s"}, "plugin_options.default.watchdog: expected a number, got '5s'"),
])
def test_bad_ready_and_watchdog_options(entry: dict[str, object], message: str) -> None:
    with pytest.raises(OptionError) as caught:
        parse_options({"default": entry})
    assert message in str(caught.value)


# ---------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(("data", "expected"), [
    (b"READY=1", Notice(ready=True)),
    (b"READY=1\n", Notice(ready=True)),
    (b"READY=0", Notice(ignored=("READY=0",))),
    (b"STATUS=warming up: 3/10", Notice(status="warming up: 3/10")),
    (b"STATUS=", Notice(status="")),
    (b"STATUS=a=b", Notice(status="a=b")),
    (b"WATCHDOG=1", Notice(watchdog=True)),
    (b"WATCHDOG=trigger", Notice(watchdog_trigger=True)),
    (b"WATCHDOG=2", Notice(ignored=("WATCHDOG=2",))),
    (b"STOPPING=1", Notice(stopping=True)),
    (b"EXTEND_TIMEOUT_USEC=5000000", Notice(extend_timeout_usec=5_000_000)),
    (b"EXTEND_TIMEOUT_USEC=-5", Notice(ignored=("EXTEND_TIMEOUT_USEC=-5",))),
    (b"EXTEND_TIMEOUT_USEC=1e6", Notice(ignored=("EXTEND_TIMEOUT_USEC=1e6",))),
    (b"BARRIER=1", Notice(barrier=True)),
    (b"READY=1\nSTATUS=up\nMAINPID=42", Notice(ready=True, status="up")),
    (b"\n\nREADY=1\n\n", Notice(ready=True)),
    (b"STATUS=one\nSTATUS=two", Notice(status="two")),  # the last one wins, as in systemd
    (b"FDSTORE=1\nnonsense", Notice(ignored=("nonsense", "FDSTORE"))),
    (b"=1", Notice(ignored=("=1",))),
    (b"READY=1\0", Notice(ignored=("<NUL byte: datagram ignored>",))),
    (b"STATUS=\xff\xfe ok", Notice(status="\ufffd\ufffd ok")),
    (b"", Notice()),
])
def test_parse_notice(data: bytes, expected: Notice) -> None:
    assert parse_notice(data) == expected


def test_status_text_is_bounded() -> None:
    assert len(parse_notice(b"STATUS=" + b"x" * 4000).status or "") == 1024


@pytest.mark.parametrize(("text", "expected"), [
    ("42 (bash) S 1 42 42 0 -1", (42, 42)),
    ("43 (sleep) S 42 42 40 0", (42, 40)),
    ("44 (a) b) (c) R 1 7 8 0", (7, 8)),  # a command name with parentheses and spaces
    ("45 (x) S 1", None),
    ("garbage", None),
    ("46 (x) S 1 y z", None),
])
def test_stat_ids(text: str, expected: tuple[int, int] | None) -> None:
    assert stat_ids(text) == expected


@pytest.mark.parametrize(("pid", "ids", "expected"), [
    (100, None, "a"),  # the main process itself
    (101, (100, 100), "a"),  # in its process group
    (102, (102, 100), "a"),  # its own group, same session
    (103, (200, 200), "b"),
    (104, (104, 104), None),  # left the session (setsid): nobody's
    (105, None, None),  # gone before we looked
])
def test_owner_of(pid: int, ids: tuple[int, int] | None, expected: str | None) -> None:
    assert owner_of(pid, {100: "a", 200: "b"}, lambda _pid: ids) == expected


def test_plugin_variables() -> None:
    assert plugin_variables("/x/notify", None) == {"NOTIFY_SOCKET": "/x/notify"}
    assert plugin_variables("/x/notify", 2.5) == {"NOTIFY_SOCKET": "/x/notify",
                                                   "WATCHDOG_USEC": "2500000"}


# --------------------------------------------------------------------- readiness and watchdog
def test_readiness_rules() -> None:
    r = Readiness()
    r.begin(100.0, watchdog=5.0, ready_timeout=30.0)
    assert (r.ready, r.watchdog_deadline, r.ready_deadline) == (False, 105.0, 130.0)
    change = r.apply(Notice(extend_timeout_usec=60_000_000), 110.0)
    assert change.extended and r.ready_deadline == 170.0
    assert not r.apply(Notice(extend_timeout_usec=1_000_000), 111.0).extended  # never shortens
    r.apply(Notice(watchdog=True, status="warming"), 112.0)
    assert (r.watchdog_deadline, r.status_text, r.last_ping) == (117.0, "warming", 112.0)
    change = r.apply(Notice(ready=True), 113.0)
    assert change.became_ready and r.ready and r.ready_deadline is None
    assert not r.apply(Notice(ready=True), 114.0).became_ready  # once per run
    assert r.view(115.0) == {"ready": True, "status_text": "warming", "watchdog": 5.0,
                             "watchdog_left": 2.0}
    assert r.apply(Notice(watchdog_trigger=True), 116.0).trigger
    change = r.apply(Notice(stopping=True), 116.0)
    assert change.stopping and r.watchdog_deadline is None  # ending by itself: not enforced
    r.end()
    assert not r.ready and r.view(120.0)["watchdog_left"] is None
    r.begin(200.0, watchdog=None, ready_timeout=None)  # a new run starts from nothing
    assert r.view(200.0) == {"ready": False, "status_text": None, "watchdog": None,
                             "watchdog_left": None}
    r.apply(Notice(watchdog=True), 201.0)  # a pet without a watchdog period changes nothing
    assert r.watchdog_deadline is None


# ----------------------------------------------------------------------- the socket, for real
@pytest.fixture
def notify_socket() -> NotifySocket:
    sock = NotifySocket()
    yield sock
    sock.close()


def receive(sock: NotifySocket, count: int = 1, timeout: float = 10.0) -> list[tuple[bytes, int]]:
    """Datagrams (data, sender pid) as the supervisor's selector would get them."""
    found: list[tuple[bytes, int]] = []
    with selectors.DefaultSelector() as selector:
        selector.register(sock.fileno(), selectors.EVENT_READ)

        def more() -> bool:
            if selector.select(0.05):
                found.extend((d.data, d.pid) for d in sock.receive())
            return len(found) >= count

        wait_for(more, timeout, interval=0, message=f"{count} datagrams")
    return found


def test_socket_is_private_and_removed(notify_socket: NotifySocket) -> None:
    folder = os.stat(notify_socket.folder)
    assert stat.S_IMODE(folder.st_mode) == 0o700 and folder.st_uid == os.getuid()
    assert stat.S_ISSOCK(os.stat(notify_socket.path).st_mode)
    assert os.get_inheritable(notify_socket.fileno()) is False
    notify_socket.close()
    assert not os.path.exists(notify_socket.folder)


def test_sdnotify_package_sender(notify_socket: NotifySocket) -> None:
    pytest.importorskip("sdnotify")
    code = ("import sdnotify, os; n = sdnotify.SystemdNotifier(debug=True); "
            "n.notify('STATUS=loading\\nREADY=1'); print(os.getpid())")
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "NOTIFY_SOCKET": notify_socket.path})
    assert proc.returncode == 0, proc.stderr
    [(data, pid)] = receive(notify_socket)
    assert parse_notice(data) == Notice(ready=True, status="loading")
    assert pid == int(proc.stdout)  # the kernel's word, not the sender's


def test_systemd_notify_command_without_systemd(notify_socket: NotifySocket) -> None:
    """``systemd-notify`` (systemd 252 here) works with our socket: it sends READY=1 with its
    parent's PID (as root; its own otherwise), then BARRIER=1 with a pipe and waits until we
    close it, so it stays alive, and findable, until its message is handled."""
    if shutil.which("systemd-notify") is None:
        pytest.skip("systemd-notify is not installed")
    proc = subprocess.Popen(["bash", "-c", "systemd-notify --ready --status=hello; echo $?"],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "NOTIFY_SOCKET": notify_socket.path},
                            start_new_session=True)
    try:
        datagrams = receive(notify_socket, 2)
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert parse_notice(datagrams[0][0]) == Notice(ready=True, status="hello")
    assert parse_notice(datagrams[1][0]) == Notice(barrier=True)
    assert out.strip() == "0"  # our closing the descriptor released its barrier at once
    assert owner_of(datagrams[0][1], {proc.pid: "bash plugin"}) == "bash plugin"


def test_passed_descriptors_are_closed(notify_socket: NotifySocket) -> None:
    r, w = os.pipe()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(notify_socket.path)
            socket.send_fds(s, [b"BARRIER=1"], [w])
        os.close(w)
        assert parse_notice(receive(notify_socket)[0][0]).barrier
        assert os.read(r, 1) == b""  # end of file: our copy of the write end was closed
    finally:
        os.close(r)


def test_oversized_datagram_dropped(notify_socket: NotifySocket) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(notify_socket.path)
        s.send(b"STATUS=" + b"x" * MAX_DATAGRAM)
        s.send(b"READY=1")
    [(data, pid)] = receive(notify_socket)
    assert data == b"READY=1" and pid == os.getpid()


def test_other_users_cannot_reach_it(notify_socket: NotifySocket) -> None:
    if os.getuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another user")
    code = ("import socket, sys; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
            "s.sendto(b'READY=1', sys.argv[1])")
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-c", code, notify_socket.path],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "PermissionError" in proc.stderr


def test_folder_is_fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    first, second = NotifySocket(), NotifySocket()
    try:
        assert first.folder != second.folder
        assert os.path.dirname(first.folder) == str(tmp_path)
    finally:
        first.close()
        second.close()


# ------------------------------------------------------------------------- the plugin kit
def kit_env(**more: str) -> dict[str, str]:
    return {"LMCACHE_PLUGIN_ROLE": "WORKER", "LMCACHE_PLUGIN_WORKER_ID": "0",
            "LMCACHE_PLUGIN_WORKER_COUNT": "1", "LMCACHE_PLUGIN_CONFIG": "{}", **more}


def test_kit_reads_notify_variables() -> None:
    from plugin_launcher.plugin import PluginContext

    ctx = PluginContext.from_env(kit_env(NOTIFY_SOCKET="/x/notify", WATCHDOG_USEC="2500000"))
    assert (ctx.notify_socket, ctx.watchdog) == ("/x/notify", 2.5)
    bare = PluginContext.from_env(kit_env(WATCHDOG_USEC="junk"))
    assert (bare.notify_socket, bare.watchdog) == (None, None)
    assert not bare.notify_ready() and not bare.pet_watchdog()  # no launcher: quietly nothing
    gone = PluginContext.from_env(kit_env(NOTIFY_SOCKET="/nonexistent/notify"))
    assert not gone.notify_status("x")  # never raises into the plugin


def test_kit_sends_ready_and_status(notify_socket: NotifySocket) -> None:
    from plugin_launcher.plugin import PluginContext

    ctx = PluginContext.from_env(kit_env(NOTIFY_SOCKET=notify_socket.path))
    assert ctx.notify_status("loading\nshard 2") and ctx.notify_ready("serving")
    notices = [parse_notice(data) for data, _ in receive(notify_socket, 2)]
    assert notices == [Notice(status="loading shard 2"), Notice(ready=True, status="serving")]


def test_kit_every_pets_the_watchdog_until_a_call_hangs(notify_socket: NotifySocket) -> None:
    """every() pets at least every half period between calls (here: calls every 0.6 s, a
    0.2 s watchdog), and stops petting once a call hangs past its timeout."""
    import threading
    import time

    from plugin_launcher.plugin import PluginContext

    ctx = PluginContext.from_env(kit_env(NOTIFY_SOCKET=notify_socket.path,
                                         WATCHDOG_USEC="200000"))
    hang = threading.Event()
    release = threading.Event()
    calls: list[float] = []

    def work() -> None:
        calls.append(time.monotonic())
        if hang.is_set():
            release.wait(30)

    loop = threading.Thread(target=ctx.every, args=(0.6, work), kwargs={"timeout": 5.0})
    loop.start()
    try:
        pets = receive(notify_socket, 8, timeout=10)
        assert all(parse_notice(d) == Notice(watchdog=True) for d, _ in pets)
        assert len(calls) <= 3  # many pets per call: the pets do not wait for the interval
        hang.set()
        wait_for(lambda: len(calls) >= 3, 10, message="a hanging call")
        while receive_nowait(notify_socket):  # drain the pets sent before the hang
            time.sleep(0.25)
        time.sleep(0.5)  # (asserting an absence) more than two watchdog periods
        assert receive_nowait(notify_socket) == []
    finally:
        ctx.stop()
        release.set()
        loop.join(10)


def receive_nowait(sock: NotifySocket) -> list[bytes]:
    return [d.data for d in sock.receive()]


# ----------------------------------------------------------------------- in a real launcher
from helpers import CLI, start, status_of, write_plugin  # noqa: E402

from plugin_launcher import PluginLauncher  # noqa: E402
from plugin_launcher.status_server import serve_status  # noqa: E402

SDNOTIFY_PLUGIN = """\
import os, sdnotify, time
n = sdnotify.SystemdNotifier()
print("loading", flush=True)  # a line, but not READY=1: still starting
with open(os.environ["OUT"] + "/socket", "w") as f:
    f.write(os.environ["NOTIFY_SOCKET"])
n.notify("STATUS=loading the model")
while not os.path.exists(os.environ["OUT"] + "/go"):
    time.sleep(0.02)
n.notify("READY=1\\nSTATUS=serving")
while True:
    time.sleep(1)
"""

BASH_PLUGIN = """\
#!/bin/bash
echo "warming up"
until [ -e "$OUT/go" ]; do sleep 0.02; done
systemd-notify --ready --status="bash is up"
exec sleep 60
"""


def launch(plugin_dir: Path, launchers: list[PluginLauncher], options: dict[str, object]
           ) -> PluginLauncher:
    config = {"plugin_locations": [str(plugin_dir)],
              "plugin_options": {"default": {"stop_timeout": 1}, **options}}
    return start(PluginLauncher(config, "worker", output_batch=0), launchers)


def test_sdnotify_and_systemd_notify_plugins_become_ready(
        plugin_dir: Path, launchers: list[PluginLauncher], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, logs: object) -> None:
    pytest.importorskip("sdnotify")
    if shutil.which("systemd-notify") is None:
        pytest.skip("systemd-notify is not installed")
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")  # the launcher's own: not passed
    write_plugin(plugin_dir, "all_py.py", SDNOTIFY_PLUGIN)
    write_plugin(plugin_dir, "all_sh.sh", BASH_PLUGIN)
    launcher = launch(plugin_dir, launchers, {"all_py.py": {"ready": "notify"},
                                              "all_sh.sh": {"ready": "notify"}})
    entry = wait_for(lambda: (e := status_of(launcher, "all_py.py")) and e["output_lines"]
                     and e["status_text"] == "loading the model" and e, 10,
                     message="the first line and status text")
    assert (entry["state"], entry["ready"], entry["ready_mode"]) == ("starting", False, "notify")
    path = (tmp_path / "socket").read_text()
    assert path != "/run/systemd/notify" and stat.S_ISSOCK(os.stat(path).st_mode)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:  # not a plugin: ignored
        s.sendto(b"READY=1", path)
    sh = wait_for(lambda: (e := status_of(launcher, "all_sh.sh")) and e["output_lines"] and e,
                  10, message="the bash plugin's first line")
    assert sh["state"] == "starting"
    (tmp_path / "go").touch()
    for name, text in (("all_py.py", "serving"), ("all_sh.sh", "bash is up")):
        done = wait_for(lambda n=name: (e := status_of(launcher, n)) and e["ready"] and e, 10,
                        message=f"{name} to be ready")
        assert (done["state"], done["status_text"]) == ("running", text)


WATCHED = """\
import os, time
from plugin_launcher.plugin import PluginContext
ctx = PluginContext.from_env()

def work():
    if os.path.exists(os.environ["OUT"] + "/hang"):
        time.sleep(3600)  # hung: every() stops petting

ctx.every(0.1, work)
"""


def test_plugin_that_stops_petting_is_restarted(plugin_dir: Path,
                                                launchers: list[PluginLauncher],
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                logs: object) -> None:
    monkeypatch.setenv("OUT", str(tmp_path))
    write_plugin(plugin_dir, "all_watched.py", WATCHED)
    launcher = launch(plugin_dir, launchers, {"all_watched.py": {
        "watchdog": 1.0, "restart": "on-failure", "backoff": {"initial": 0.05, "max": 0.05}}})
    first = wait_for(lambda: (e := status_of(launcher, "all_watched.py"))
                     and e["state"] == "running" and e, 10, message="it to run")
    assert first["watchdog"] == 1.0
    time.sleep(1.5)  # (asserting an absence) longer than the watchdog: pets keep it alive
    assert status_of(launcher, "all_watched.py")["pid"] == first["pid"]
    assert 0 < status_of(launcher, "all_watched.py")["watchdog_left"] <= 1.0
    (tmp_path / "hang").touch()
    hung_at = time.monotonic()
    wait_for(lambda: logs.having("plugin all_watched.py missed its watchdog: no WATCHDOG=1 "
                                 "for 1s; stopping it as a failure"), 10,
             message="the missed watchdog line")
    detected = time.monotonic() - hung_at
    print(f"missed watchdog detected {detected:.3f}s after the hang began")
    (tmp_path / "hang").unlink()
    again = wait_for(lambda: (e := status_of(launcher, "all_watched.py")) and e["restarts"] == 1
                     and e["state"] == "running" and e, 10, message="a restart")
    assert again["pid"] != first["pid"]
    assert logs.having("plugin all_watched.py killed by SIG", "(missed its watchdog: no "
                       "WATCHDOG=1 for 1s); restarting in")
    assert detected < 2.5, detected  # within the watchdog period (1 s) plus a pet interval


def test_ready_timeout_and_watchdog_trigger_are_failures(
        plugin_dir: Path, launchers: list[PluginLauncher], logs: object) -> None:
    write_plugin(plugin_dir, "all_silent.sh", "#!/bin/bash\necho up\nexec sleep 60\n")
    write_plugin(plugin_dir, "all_trigger.py", (
        "import sdnotify, time\nn = sdnotify.SystemdNotifier()\n"
        "n.notify('READY=1')\ntime.sleep(0.3)\nn.notify('WATCHDOG=trigger')\ntime.sleep(60)\n"))
    launcher = launch(plugin_dir, launchers, {"all_silent.sh": {"ready": "notify",
                                                                 "ready_timeout": 0.5},
                                              "all_trigger.py": {"ready": "notify"}})
    silent = wait_for(lambda: (e := status_of(launcher, "all_silent.sh"))
                      and e["state"] == "exited" and e, 10, message="the ready timeout")
    assert silent["ended_by"] == "not ready after 0.5s" and silent["signal"] == "SIGTERM"
    assert logs.having("plugin all_silent.sh sent no READY=1 within 0.5s (ready_timeout); "
                       "stopping it as a failure")
    trigger = wait_for(lambda: (e := status_of(launcher, "all_trigger.py"))
                       and e["state"] == "exited" and e, 10, message="the watchdog trigger")
    assert trigger["ended_by"] == "asked for its watchdog (WATCHDOG=trigger)"


def fetch_code(port: int, path: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode().strip()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode().strip()


def test_healthz_and_readyz_follow_the_plugins(plugin_dir: Path,
                                               launchers: list[PluginLauncher],
                                               tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("sdnotify")
    monkeypatch.setenv("OUT", str(tmp_path))
    write_plugin(plugin_dir, "all_py.py", SDNOTIFY_PLUGIN)
    write_plugin(plugin_dir, "all_crash.sh", (
        '#!/bin/bash\nuntil [ -e "$OUT/crash" ]; do sleep 0.02; done\nexit 4\n'))
    launcher = launch(plugin_dir, launchers, {
        "all_py.py": {"ready": "notify"},
        "all_crash.sh": {"restart": "on-failure", "max_restarts": 1,
                         "backoff": {"initial": 0.3, "max": 0.3}}})
    server = serve_status(launcher.status_snapshot, "127.0.0.1", 0)
    try:
        port = server.server_address[1]
        wait_for(lambda: fetch_code(port, "/readyz") == (
            503, "plugin all_py.py is not ready (starting; no READY=1 yet)"), 10,
            message="/readyz 503 while starting")
        assert fetch_code(port, "/healthz") == (200, "ok")
        (tmp_path / "go").touch()
        wait_for(lambda: fetch_code(port, "/readyz") == (200, "ready"), 10,
                 message="/readyz 200 once ready")
        (tmp_path / "crash").touch()
        wait_for(lambda: status_of(launcher, "all_crash.sh")["state"] == "backoff", 10,
                 message="the first crash")
        assert fetch_code(port, "/healthz") == (200, "ok")  # waiting to restart: healthy
        wait_for(lambda: fetch_code(port, "/healthz") == (
            503, "plugin all_crash.sh failed (exited with code 4; gave up)"), 10,
            message="/healthz 503 once it gave up")
        assert fetch_code(port, "/readyz") == (200, "ready")
    finally:
        server.shutdown()
        server.server_close()


def run_cli(plugin_dir: Path, tmp_path: Path, command: list[str], ready_timeout: float,
            ) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"plugin_locations": [str(plugin_dir)], "plugin_options": {
        "default": {"stop_timeout": 1},
        "all_py.py": {"ready": "notify", "ready_timeout": ready_timeout}}}))
    return subprocess.run([*CLI, "run", "--role", "worker", "--config", str(config),
                           "--wait-ready", "--", *command], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "OUT": str(tmp_path)},
                          stdin=subprocess.DEVNULL)


def test_wait_ready_orders_command_after_readiness(plugin_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("sdnotify")
    write_plugin(plugin_dir, "all_py.py", SDNOTIFY_PLUGIN.replace(
        'while not os.path.exists(os.environ["OUT"] + "/go"):\n    time.sleep(0.02)\n',
        'time.sleep(0.5)\nopen(os.environ["OUT"] + "/ready-sent", "w").close()\n'))
    result = run_cli(plugin_dir, tmp_path, ["sh", "-c", 'test -e "$OUT/ready-sent" && '
                                            'echo "command ran after ready"; exit 7'], 20)
    assert result.returncode == 7, result.stderr
    assert "command ran after ready" in result.stdout
    assert "--wait-ready: starting sh once all_py.py is ready (at most 20s)" in result.stderr
    assert "--wait-ready: ready; starting sh" in result.stderr


def test_wait_ready_fails_clearly_and_never_starts_command(plugin_dir: Path,
                                                           tmp_path: Path) -> None:
    write_plugin(plugin_dir, "all_py.py", "import time\nprint('never ready', flush=True)\n"
                                          "time.sleep(60)\n")
    result = run_cli(plugin_dir, tmp_path, ["sh", "-c", 'touch "$OUT/ran"'], 0.5)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if "--wait-ready" in line]
    assert any("ERROR --wait-ready: plugin all_py.py ended before it was ready (not ready "
               "after 0.5s); not starting sh" in line for line in lines), result.stderr
    assert not (tmp_path / "ran").exists()


# ------------------------------------------------------------------- the machine's new rules
def machine(**options: object):  # type: ignore[no-untyped-def]
    from plugin_launcher.machine import PluginMachine

    clock = [0.0]
    return PluginMachine(PluginOptions(**options), lambda: clock[0])  # type: ignore[arg-type]


def test_machine_ready_notify_rules() -> None:
    from plugin_launcher.machine import Arm, Cancel, Log, State, Terminate

    m = machine(ready="notify", ready_timeout=30.0)
    m.start()
    assert m.spawned() == [Arm("ready", 30.0)]  # no "up" timer: output does not count
    assert m.output() == [] and m.state == State.STARTING
    assert m.extend_ready(45.0) == [Arm("ready", 45.0)]
    assert m.ready() == [Cancel("ready"), Log(20, "is ready")]
    assert m.state == State.RUNNING and m.ready() == []
    assert m.watchdog_missed("missed its watchdog")[-1] == Terminate(5.0)
    assert m.state == State.STOPPING and m.ended_by == "missed its watchdog"
    m.ended(-15)
    assert m.last_failure and m.state == State.EXITED  # restart: never
    m.start()
    assert m.ended_by is None  # a new run starts clean
    m.spawned()
    actions = m.fired("ready")
    assert Log(30, "sent no READY=1 within 30s (ready_timeout); stopping it as a failure") \
        in actions and m.ended_by == "not ready after 30s"
    plain = machine()
    plain.start()
    plain.spawned()
    assert plain.ready() == [] and plain.state == State.STARTING  # READY=1 is data only


def test_machine_standby_rules() -> None:
    from plugin_launcher.machine import ACTIVE_STATES, Renew, Spawn, State

    m = machine(scope="host")
    assert m.start() == [Spawn()]
    assert m.standby() == [] and m.state == State.STANDBY
    assert State.STANDBY in ACTIVE_STATES  # `run` stays up to take over
    assert m.start() == [Spawn()] and m.state == State.STARTING  # the lock came free
    m.standby()
    assert m.stop() == [] and m.state == State.STOPPED
    m.start()
    m.standby()
    assert m.replace() == [Renew()] and m.state == State.STOPPED
