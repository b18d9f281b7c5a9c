"""sd_notify: parsing, attribution by kernel credentials, the socket with real senders (the
``sdnotify`` package, ``systemd-notify``, raw datagrams), and readiness/watchdog in a launcher."""

from __future__ import annotations

import os
import selectors
import shutil
import socket
import stat
import subprocess
import sys
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
