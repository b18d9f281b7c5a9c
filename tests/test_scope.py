"""Once-per-host plugins (``scope: host``): the lock's rules and kernel semantics, then real
launchers, and a real ``mpirun -n 4`` on this host."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import PYTHON, alive, wait_for

from plugin_launcher.folders import folder_problem
from plugin_launcher.options import OptionError, parse_options
from plugin_launcher.scope import (
    ENV_FOLDER,
    HostLock,
    ScopeError,
    ensure_folder,
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


# ------------------------------------------------------------------- launchers in this process
from helpers import start, status_of, wait_running, write_plugin  # noqa: E402

from plugin_launcher import PluginLauncher  # noqa: E402

RECORDER = """\
#!/bin/bash
echo "$LMCACHE_PLUGIN_WORKER_ID $$" >> "$OUT/runs"
exec sleep 600
"""


def scoped_launcher(plugin_dir: Path, worker_id: int, key: str | None = None) -> PluginLauncher:
    options: dict[str, object] = {"scope": "host", "stop_timeout": 1}
    if key is not None:
        options["scope_key"] = key
    config = {"plugin_locations": [str(plugin_dir)],
              "plugin_options": {"all_exporter.sh": options}}
    return PluginLauncher(config, "worker", worker_id=worker_id, worker_count=3, output_batch=0)


def runs(tmp_path: Path) -> list[tuple[int, int]]:
    try:
        return [(int(a), int(b)) for a, b in
                (line.split() for line in (tmp_path / "runs").read_text().splitlines())]
    except FileNotFoundError:
        return []


def test_one_runs_others_stand_by_and_take_over(plugin_dir: Path, tmp_path: Path,
                                                launchers: list[PluginLauncher],
                                                tracker: Any, logs: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_FOLDER, str(tmp_path / "locks"))
    monkeypatch.setenv("OUT", str(tmp_path))
    write_plugin(plugin_dir, "all_exporter.sh", RECORDER)
    write_plugin(plugin_dir, "all_local.sh", "#!/bin/bash\nexec sleep 600\n")
    first = start(scoped_launcher(plugin_dir, 0), launchers)
    pid = wait_running(first, "all_exporter.sh", tracker)
    others = [start(scoped_launcher(plugin_dir, i), launchers) for i in (1, 2)]
    for launcher in others:
        entry = wait_for(lambda lr=launcher: (e := status_of(lr, "all_exporter.sh"))
                         and e["state"] == "standby" and e, 10, message="standby")
        assert entry["pid"] is None and entry["scope"] == "host"
        assert entry["holder"] == f"pid={os.getpid()} role=worker worker=0"
        wait_running(launcher, "all_local.sh", tracker)  # the others run as usual
    assert runs(tmp_path) == [(0, pid)]
    assert not others[-1].settled  # standing by keeps `run` up, ready to take over
    assert logs.having("plugin all_exporter.sh on standby: another launcher of this host runs "
                       "it (pid=")

    stopped_at = time.monotonic()
    first.stop_plugins()
    wait_for(lambda: len(runs(tmp_path)) == 2, 5, message="a takeover")
    assert time.monotonic() - stopped_at < 2.0
    assert not alive(pid)  # the old one was gone before the new one started
    taker = next(lr for lr in others if status_of(lr, "all_exporter.sh")["state"] != "standby")
    wait_running(taker, "all_exporter.sh", tracker)
    rest = [lr for lr in others if lr is not taker]
    assert status_of(rest[0], "all_exporter.sh")["state"] == "standby"
    assert logs.having("plugin all_exporter.sh: taking over on this host")


def test_scope_key_separates_groups(plugin_dir: Path, tmp_path: Path,
                                    launchers: list[PluginLauncher], tracker: Any,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_FOLDER, str(tmp_path / "locks"))
    monkeypatch.setenv("OUT", str(tmp_path))
    write_plugin(plugin_dir, "all_exporter.sh", RECORDER)
    a = start(scoped_launcher(plugin_dir, 0, "model-a"), launchers)
    b = start(scoped_launcher(plugin_dir, 1, "model-b"), launchers)
    wait_running(a, "all_exporter.sh", tracker)
    wait_running(b, "all_exporter.sh", tracker)


def test_unusable_lock_folder_is_one_clear_failure(plugin_dir: Path, tmp_path: Path,
                                                   launchers: list[PluginLauncher],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "shared"
    bad.mkdir(mode=0o777)
    bad.chmod(0o777)
    monkeypatch.setenv(ENV_FOLDER, str(bad))
    write_plugin(plugin_dir, "all_exporter.sh", RECORDER)
    launcher = start(scoped_launcher(plugin_dir, 0), launchers)
    entry = wait_for(lambda: (e := status_of(launcher, "all_exporter.sh"))
                     and e["state"] == "failed" and e, 10, message="a failure")
    assert entry["error"] == (f"scope: host: lock folder {bad} is writable by group or others "
                              "(mode 0777); refusing to use it")


# ------------------------------------------------------------------------ a real mpirun -n 4
MPI_RANKS = 4
RANK_WRAPPER = """\
#!/bin/sh
# One rank: the launcher in the background (so that SIGKILLing it does not make mpirun abort
# the other ranks), its PID and stderr where the test finds them.
rank=$OMPI_COMM_WORLD_RANK
"$@" 2> "$OUT/rank-$rank.err" &
echo $! > "$OUT/rank-$rank.pid"
wait $!
exit 0
"""


def fetch_status(port: int) -> dict[str, dict[str, Any]]:
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10) as answer:
        return {e["name"]: e for e in json.loads(answer.read())}


def rank_ports(tmp_path: Path) -> dict[int, int] | None:
    import re

    ports = {}
    for rank in range(MPI_RANKS):
        try:
            text = (tmp_path / f"rank-{rank}.err").read_text()
        except FileNotFoundError:
            return None
        found = re.search(r"serving status on http://127\.0\.0\.1:(\d+)/", text)
        if found is None:
            return None
        ports[rank] = int(found.group(1))
    return ports


def states(ports: dict[int, int]) -> dict[int, str]:
    return {rank: fetch_status(port)["all_exporter.sh"]["state"] for rank, port in ports.items()}


@pytest.mark.skipif(shutil.which("mpirun") is None,
                    reason="mpirun not installed (Debian: apt-get install openmpi-bin)")
def test_mpirun_four_ranks_run_a_host_plugin_once_and_take_over(plugin_dir: Path,
                                                                tmp_path: Path) -> None:
    write_plugin(plugin_dir, "all_exporter.sh", (
        "#!/bin/bash\necho \"$LMCACHE_PLUGIN_WORKER_ID $$\" >> \"$OUT/runs\"\nexec sleep 600\n"))
    config = tmp_path / "config.yaml"
    config.write_text('{"plugin_options": {"all_exporter.sh": {"scope": "host", '
                      '"stop_timeout": 1}}}')
    wrapper = tmp_path / "rank.sh"
    wrapper.write_text(RANK_WRAPPER)
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_"))}
    env.update(OUT=str(tmp_path), PLUGIN_LAUNCHER_LOCK_DIR=str(tmp_path / "locks"))
    engine = subprocess.Popen(
        ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(MPI_RANKS), str(wrapper),
         PYTHON, "-m", "plugin_launcher", "run", "--role", "worker", "--worker-id", "auto",
         "--worker-count", "auto", "--config", str(config), "--plugin-location",
         str(plugin_dir), "--status-addr", "127.0.0.1:0"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    pids: dict[int, int] = {}
    try:
        ports = wait_for(lambda: rank_ports(tmp_path), 60, interval=0.1,
                         message="every rank's status server")
        pids = {rank: int((tmp_path / f"rank-{rank}.pid").read_text()) for rank in ports}
        seen = wait_for(lambda: (s := states(ports)) and sorted(s.values()) == [
            "running", *["standby"] * (MPI_RANKS - 1)] and s, 20, interval=0.1,
            message="one rank running the plugin, the others on standby")
        holder = next(rank for rank, state in seen.items() if state == "running")
        assert [rank for rank, _ in runs(tmp_path)] == [holder]  # started exactly once
        for rank, port in ports.items():
            if rank != holder:
                entry = fetch_status(port)["all_exporter.sh"]
                assert entry["holder"] == f"pid={pids[holder]} role=worker worker={holder}"
        old_plugin = runs(tmp_path)[0][1]

        os.kill(pids[holder], signal.SIGKILL)  # however it dies: the kernel drops the lock
        killed_at = time.monotonic()
        wait_for(lambda: len(runs(tmp_path)) == 2, 10, interval=0.01,
                 message="another rank to take over")
        takeover = time.monotonic() - killed_at
        print(f"takeover {takeover:.3f}s after SIGKILL of the holder")
        assert takeover < 2.0, takeover
        new_rank = runs(tmp_path)[1][0]
        assert new_rank != holder
        del ports[holder]
        after = wait_for(lambda: (s := states(ports))[new_rank] == "running" and s, 10,
                         message="the new holder's status")
        assert sorted(after.values()) == ["running", *["standby"] * (MPI_RANKS - 2)]
        wait_for(lambda: not alive(old_plugin), 10, message="the guardian to end the old one")
        assert len(runs(tmp_path)) == 2
    finally:
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            out, _ = engine.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            engine.kill()
            out, _ = engine.communicate()
    for _, plugin_pid in runs(tmp_path):
        assert not alive(plugin_pid)


def test_ctl_status_names_the_holder(capsys: pytest.CaptureFixture[str]) -> None:
    from plugin_launcher.control import _print_status

    _print_status({"plugins": [
        {"name": "all_exporter.sh", "state": "standby", "pid": None, "restarts": 0,
         "returncode": None, "holder": "pid=4242 role=worker worker=0"},
        {"name": "all_warm.py", "state": "running", "pid": 7, "restarts": 0,
         "returncode": None, "status_text": "serving on :9400"}]})
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split(None, 4) == ["all_exporter.sh", "standby", "-", "0",
                                       "held by pid=4242 role=worker worker=0"]
    assert lines[2].endswith("serving on :9400")
