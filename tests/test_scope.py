"""Once-per-host plugins (``scope: host``): the lock's rules and kernel semantics, then real
launchers, and a real ``mpirun -n 4`` on this host."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest
from helpers import PYTHON, alive, wait_for

from plugin_launcher.options import OptionError, parse_options
from plugin_launcher.scope import (
    ENV_FOLDER,
    HostLock,
    ScopeError,
    ensure_folder,
    folder_problem,
    lock_folder,
    lock_name,
    open_lock,
)


# ---------------------------------------------------------------------------------- options
def test_scope_options() -> None:
    table = parse_options({"all_exporter.py": {"scope": "host", "scope_key": "model-a"}})
    options = table.for_plugin("all_exporter.py")
    assert (options.scope, options.scope_key) == ("host", "model-a")
    assert (table.default.scope, table.default.scope_key) == ("process", None)
    assert parse_options({"default": {"scope_key": 7}}).default.scope_key == "7"


@pytest.mark.parametrize(("entry", "message"), [
    ({"scope": "node"}, "plugin_options.default.scope: expected one of process, host, "
                        "got 'node'"),
    ({"scope_key": ""}, "plugin_options.default.scope_key: expected a short name"),
    ({"scope_key": "a\nb"}, "plugin_options.default.scope_key: expected a short name"),
    ({"scope_key": "x" * 201}, "(at most 200 printable characters)"),
    ({"scope_key": ["a"]}, "scope_key: expected a short name"),
])
def test_bad_scope_options(entry: dict[str, object], message: str) -> None:
    with pytest.raises(OptionError) as caught:
        parse_options({"default": entry})
    assert message in str(caught.value)


# ------------------------------------------------------------------------------ pure rules
@pytest.mark.parametrize(("name", "key", "expected"), [
    ("all_exporter.py", None, "default--all_exporter.py.lock"),
    ("all_exporter.py", "model-a", "model-a--all_exporter.py.lock"),
    ("sub/all_x.sh", None, "default--sub%2Fall_x.sh.lock"),  # never a path
    ("../all_x.sh", "../..", "..%2F..--..%2Fall_x.sh.lock"),
    ("all_\udcff.sh", None, "default--all_%FF.sh.lock"),  # a non-UTF-8 file name
])
def test_lock_name(name: str, key: str | None, expected: str) -> None:
    assert lock_name(name, key) == expected


def test_long_lock_names_stay_distinct() -> None:
    a, b = lock_name("a" * 300 + "1", None), lock_name("a" * 300 + "2", None)
    assert a != b and len(a) <= 205


def test_lock_folder() -> None:
    assert lock_folder(1000, {ENV_FOLDER: "/srv/locks"}) == "/srv/locks"
    expected = ("/run/lock/plugin-launcher-1000" if os.access("/run/lock", os.W_OK)
                else "/tmp/plugin-launcher-1000/scope")
    assert lock_folder(1000, {"XDG_RUNTIME_DIR": "/run/user/1000"}) == expected


def test_folder_checks(tmp_path: Path) -> None:
    folder = tmp_path / "locks" / "deep"
    ensure_folder(str(folder))
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    folder.chmod(0o777)
    with pytest.raises(ScopeError, match=r"lock folder .*deep is writable by group or others "
                                         r"\(mode 0777\); refusing to use it"):
        ensure_folder(str(folder))
    st = os.stat(tmp_path)
    assert folder_problem(st, st.st_uid + 1) is not None
    assert folder_problem(os.stat(__file__), os.getuid()) == "is not a directory"


# ------------------------------------------------------------------------ kernel semantics
def test_one_holder_at_a_time(tmp_path: Path) -> None:
    first = open_lock("all_x.sh", None, "pid=1", str(tmp_path))
    second = open_lock("all_x.sh", None, "pid=2", str(tmp_path))
    other = open_lock("all_x.sh", "another-group", "pid=3", str(tmp_path))
    try:
        assert first.try_acquire() and first.try_acquire()  # idempotent
        assert not second.try_acquire()  # flock: per open file, even within one process
        assert other.try_acquire()  # another scope_key is another lock
        assert second.holder() == "pid=1"
        first.release()
        assert second.try_acquire() and second.holder() == "pid=2"
    finally:
        for lock in (first, second, other):
            lock.release()


HOLDER = textwrap.dedent("""\
    import os, subprocess, sys, time
    from plugin_launcher.scope import open_lock
    lock = open_lock("all_x.sh", None, f"pid={os.getpid()}", sys.argv[1])
    assert lock.try_acquire()
    child = subprocess.Popen(["sleep", "60"])  # exec'd: must not inherit the descriptor
    forked = os.fork()  # forked without exec: must drop it
    if forked == 0:
        time.sleep(60)
        os._exit(0)
    print(child.pid, forked, flush=True)
    time.sleep(60)
""")


def test_lock_goes_with_a_killed_holder_not_with_its_children(tmp_path: Path) -> None:
    holder = subprocess.Popen([PYTHON, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout is not None
    child, forked = (int(x) for x in holder.stdout.readline().split())
    try:
        lock = HostLock(str(tmp_path / lock_name("all_x.sh", None)), "me")
        assert not lock.try_acquire()
        assert lock.holder() == f"pid={holder.pid}"
        fds = [os.readlink(f"/proc/{child}/fd/{fd}") for fd in os.listdir(f"/proc/{child}/fd")]
        assert not [p for p in fds if p.endswith(".lock")], fds
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert alive(child) and alive(forked)  # its children live on, the lock does not
        assert wait_for(lock.try_acquire, 2.0, message="the lock to be free")
        lock.release()
    finally:
        for pid in (child, forked):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        holder.kill()
        holder.wait()
        holder.stdout.close()
