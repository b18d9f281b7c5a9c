"""Per-plugin resource limits (issue 7): nice, memory_max, open_files_max, cpu_time_max.

The limits are applied in the child with setrlimit/setpriority (no cgroup v2 here), so every test
checks them where a user would: in /proc/<pid>, in how a plugin that crosses one ends, in the log
line naming the limit, and in what the restart policy does about it.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import (
    CLI,
    PYTHON,
    running_pid,
    start,
    status_of,
    wait_for,
    wait_gone,
    wait_running,
    write_plugin,
)

from plugin_launcher import ConfigError, PluginLauncher

ROLE = "worker"
DEADLINE = 10.0  # only reached when something is wrong
MIB = 1 << 20




def make_config(plugin_dir: Path, options: dict[str, Any]) -> dict[str, Any]:
    default = {"stop_timeout": 1.0, **options.pop("default", {})}
    return {"plugin_locations": [str(plugin_dir)],
            "plugin_options": {"default": default, **options}}










def proc_nice(pid: int) -> int:
    """Field 19 of /proc/<pid>/stat (counting from 1; the fields after "(comm)" start at 3)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[19 - 3])


def proc_limit(pid: int, what: str) -> tuple[str, str]:
    """(soft, hard) of one row of /proc/<pid>/limits, e.g. "Max open files"."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith(what):
            soft, hard = line[len(what):].split()[:2]
            return soft, hard
    raise AssertionError(f"no {what!r} row in /proc/{pid}/limits")


SLEEPER = "#!/bin/sh\necho started $$\nexec sleep 60\n"


# ------------------------------------------------------------------------------ memory_max


def test_memory_max_stops_a_greedy_plugin_and_counts_as_failure(plugin_dir, tracker, launchers,
                                                                  logs):
    """500 MB under memory_max: 200M fails, names the limit, is restarted (on-failure) and then
    given up on; a plugin beside it runs on untouched."""
    write_plugin(plugin_dir, "worker_greedy.py",
                 f"#!{PYTHON}\nprint('allocating', flush=True)\n"
                 "buf = bytearray(500 * 1024 * 1024)\nprint('allocated 500 MB', flush=True)\n"
                 "import time\ntime.sleep(60)\n")
    write_plugin(plugin_dir, "worker_calm.sh", SLEEPER)
    config = make_config(plugin_dir, {"worker_greedy.py": {
        "memory_max": "200M", "restart": "on-failure", "max_restarts": 1,
        "backoff": {"initial": 0.1, "max": 0.2}}})
    launcher = start(PluginLauncher(config, ROLE), launchers)
    calm_pid = wait_running(launcher, "worker_calm.sh", tracker)

    wait_for(lambda: status_of(launcher, "worker_greedy.py")["state"] == "failed", DEADLINE,
             message="worker_greedy.py to be given up on")
    greedy_pids = logs.started_pids("worker_greedy.py")
    tracker.add(*greedy_pids)
    assert len(greedy_pids) == 2  # the first run and one restart (max_restarts: 1)
    wait_gone(greedy_pids)
    entry = status_of(launcher, "worker_greedy.py")
    assert entry["restarts"] == 1
    assert entry["exit_code"] not in (None, 0)
    limit_lines = logs.having("plugin worker_greedy.py", f"memory_max={200 * MIB}")
    assert len(limit_lines) == 2, logs.lines()
    assert "restarting" in limit_lines[0]
    assert "giving up" in limit_lines[1]
    out = logs.output("worker_greedy.py")
    assert out.count("allocating") == 2
    assert "allocated 500 MB" not in out
    assert any("MemoryError" in line for line in out)

    assert running_pid(launcher, "worker_calm.sh") == calm_pid  # unaffected
    assert logs.started_pids("worker_calm.sh") == [calm_pid]


def test_a_memory_cgroup_oom_kill_is_reported_as_memory_max(plugin_dir, tracker, launchers,
                                                               logs, tmp_path):
    """Memory that RLIMIT_AS does not see (tmpfs pages) still counts in the plugin's memory
    cgroup: the kernel SIGKILLs it there, and the log names the limit, not just the signal."""
    from plugin_launcher.containment import Containment

    found = Containment.detect()
    found.close()
    if found.memory_root is None:
        pytest.skip("no writable cgroup memory controller here: memory_max is RLIMIT_AS only")
    shm = Path("/dev/shm") / f"plugin-launcher-test-{os.getpid()}-{tmp_path.name}"
    write_plugin(plugin_dir, "worker_shm.sh",
                 f"#!/bin/sh\necho filling\nexec dd if=/dev/zero of={shm} bs=1M count=256\n")
    config = make_config(plugin_dir, {"worker_shm.sh": {"memory_max": "64M"}})
    try:
        launcher = start(PluginLauncher(config, ROLE), launchers)
        wait_for(lambda: status_of(launcher, "worker_shm.sh")["state"] in ("exited", "failed"),
                 DEADLINE, message="worker_shm.sh to be stopped by its memory cgroup")
        tracker.add(*logs.started_pids("worker_shm.sh"))
        entry = status_of(launcher, "worker_shm.sh")
        assert entry["signal"] == "SIGKILL", logs.lines()
        assert logs.having("plugin worker_shm.sh", "SIGKILL",
                           f"stopped by limit memory_max={64 * MIB}"), logs.lines()
    finally:
        shm.unlink(missing_ok=True)


# -------------------------------------------------------------- nice and open_files_max


def test_nice_and_limits_are_visible_in_proc(plugin_dir, tracker, launchers, logs):
    """default: open_files_max 64 for all; one plugin adds nice 10 and memory_max 1G, and what
    it starts inherits them."""
    write_plugin(plugin_dir, "worker_limited.sh",
                 "#!/bin/sh\nsleep 60 &\necho child $!\nwait\n")
    write_plugin(plugin_dir, "worker_plain.sh", SLEEPER)
    config = make_config(plugin_dir, {
        "default": {"open_files_max": 64},
        "worker_limited.sh": {"nice": 10, "memory_max": "1G"}})
    launcher = start(PluginLauncher(config, ROLE), launchers)
    limited = wait_running(launcher, "worker_limited.sh", tracker)
    plain = wait_running(launcher, "worker_plain.sh", tracker)
    line = wait_for(lambda: logs.output("worker_limited.sh"), message="the child's PID")[0]
    child = int(line.split()[1])
    tracker.add(child)

    for pid in (limited, child):
        assert proc_nice(pid) == 10
        assert proc_limit(pid, "Max open files") == ("64", "64")
        assert proc_limit(pid, "Max address space") == (str(1 << 30), str(1 << 30))
    assert proc_nice(plain) == os.getpriority(os.PRIO_PROCESS, 0)  # not reniced
    assert proc_limit(plain, "Max open files") == ("64", "64")  # the default applies to all
    ours = resource.getrlimit(resource.RLIMIT_AS)[0]
    assert proc_limit(plain, "Max address space")[0] == (
        "unlimited" if ours == resource.RLIM_INFINITY else str(ours))

    launcher.stop_plugins(timeout=1.0)
    wait_gone([limited, child, plain])


def test_open_files_max_is_enforced(plugin_dir, tracker, launchers, logs):
    """A plugin that opens files past open_files_max fails with the limit named in the log."""
    write_plugin(plugin_dir, "worker_hoarder.py",
                 f"#!{PYTHON}\nfiles = [open('/dev/null') for _ in range(200)]\n"
                 "print('opened 200 files', flush=True)\n")
    config = make_config(plugin_dir, {"worker_hoarder.py": {"open_files_max": 32}})
    launcher = start(PluginLauncher(config, ROLE), launchers)
    wait_for(lambda: status_of(launcher, "worker_hoarder.py")["state"] == "exited", DEADLINE,
             message="worker_hoarder.py to end")
    tracker.add(*logs.started_pids("worker_hoarder.py"))
    assert status_of(launcher, "worker_hoarder.py")["exit_code"] == 1
    assert "opened 200 files" not in logs.output("worker_hoarder.py")
    assert logs.having("plugin worker_hoarder.py", "open_files_max=32")


# ------------------------------------------------------------------------------ cpu_time_max


def test_cpu_time_max_ends_a_busy_loop_with_sigxcpu(plugin_dir, tracker, launchers, logs):
    write_plugin(plugin_dir, "worker_spin.sh",
                 "#!/bin/bash\nulimit -c 0\necho spinning\nwhile :; do :; done\n")
    write_plugin(plugin_dir, "worker_calm.sh", SLEEPER)
    config = make_config(plugin_dir, {"worker_spin.sh": {"cpu_time_max": 1}})
    launcher = start(PluginLauncher(config, ROLE), launchers)
    spin = wait_running(launcher, "worker_spin.sh", tracker)
    calm = wait_running(launcher, "worker_calm.sh", tracker)
    assert proc_limit(spin, "Max cpu time")[0] == "1"

    wait_for(lambda: status_of(launcher, "worker_spin.sh")["state"] == "exited", DEADLINE,
             message="the busy loop to be stopped by its CPU limit")
    wait_gone([spin])
    entry = status_of(launcher, "worker_spin.sh")
    assert entry["signal"] == "SIGXCPU"
    assert logs.having("plugin worker_spin.sh", "SIGXCPU", "cpu_time_max")
    assert running_pid(launcher, "worker_calm.sh") == calm


# ------------------------------------------------------------------------------ bad values


BAD_VALUES = [
    ("memory_max", "lots"),
    ("memory_max", -5),
    ("nice", 50),
    ("nice", "low"),
    ("open_files_max", -1),
    ("open_files_max", 0),
    ("cpu_time_max", 0),
    ("cpu_time_max", "an hour"),
    ("memroy_max", "1G"),  # a typo is an unknown key, not silently ignored
]


@pytest.mark.parametrize("where", ["default", "worker_x.sh"])
@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_bad_limit_is_a_config_error_naming_the_key(where, key, value, plugin_dir):
    config = {"plugin_locations": [str(plugin_dir)], "plugin_options": {where: {key: value}}}
    with pytest.raises(ConfigError, match=re.escape(f"plugin_options.{where}.{key}")):
        PluginLauncher(config, ROLE)


@pytest.mark.parametrize(("action", "key", "value"), [
    ("run", "memory_max", "lots"),
    ("list", "nice", 50),
    ("list", "open_files_max", -1),
])
def test_cli_bad_limit_exits_2_with_error_line(action, key, value, plugin_dir, tmp_path, tracker):
    write_plugin(plugin_dir, "worker_a.sh", SLEEPER)
    config_file = tmp_path / "lmcache.yaml"
    config_file.write_text(yaml.safe_dump({
        "plugin_locations": [str(plugin_dir)],
        "plugin_options": {"default": {key: value}}}))
    proc = tracker.popen([*CLI, action, "--role", ROLE, "--config", str(config_file)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 2
    errors = [line for line in err.decode().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and key in errors[0], err.decode()
    assert b"started" not in out  # nothing ran


# ------------------------------------------------------------------------------- list


def test_list_says_which_limit_mechanism_applies(plugin_dir, tracker):
    write_plugin(plugin_dir, "worker_a.sh", SLEEPER)
    proc = tracker.popen([*CLI, "list", "--role", ROLE, "--plugin-location", str(plugin_dir)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 0, err.decode()
    lines = [line for line in out.decode().splitlines() if line.startswith("# limits:")]
    assert len(lines) == 1, out.decode()
    assert "setrlimit" in lines[0]
    assert "no preexec_fn" in lines[0]
    assert "cgroup memory limit" in lines[0] or "RLIMIT_AS only" in lines[0]
    held = [line for line in out.decode().splitlines() if line.startswith("# containment:")]
    assert len(held) == 1 and any(m in held[0] for m in ("cgroup v", "session ID")), held


def test_a_refused_nice_is_one_warning_and_the_plugin_runs(monkeypatch, caplog):
    """Like ``nice -n -5`` without privileges: a warning naming the plugin, never an error."""
    from plugin_launcher import process

    def refuse(which: int, who: int, prio: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(process.os, "setpriority", refuse)
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    with caplog.at_level("WARNING", logger="plugin_launcher.process"):
        process.renice(os.getpid(), -5, "worker_eager.sh")
    assert [r.getMessage() for r in caplog.records] == [
        f"plugin worker_eager.sh: cannot set nice {max(-20, ours - 5)} (Operation not "
        f"permitted); it runs at nice {ours}"]


def test_a_low_open_files_limit_is_raised_for_the_launcher_not_for_its_plugins(
        plugin_dir, tracker, tmp_path):
    """A soft RLIMIT_NOFILE of 64 (hard higher) and 40 plugins holding 3 descriptors each in the
    launcher: every plugin starts (the launcher doubles its own soft limit when it runs out),
    and each plugin keeps the soft limit of 64 it would have had (select() stays safe)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 512:
        pytest.skip(f"the hard open files limit here is {hard}: no room to raise")
    for i in range(40):
        write_plugin(plugin_dir, f"worker_p{i:02d}.sh", "#!/bin/sh\necho ready\nexec sleep 60\n")
    err = tmp_path / "err"
    with open(err, "w") as errf:
        proc = tracker.popen(["/bin/sh", "-c", 'ulimit -S -n 64 && exec "$@"', "sh", *CLI,
                              "run", "--role", ROLE, "--plugin-location", str(plugin_dir)],
                             stdout=subprocess.DEVNULL, stderr=errf)
    try:
        def started() -> list[int] | None:
            pids = [int(m) for m in re.findall(r"started plugin \S+ \(pid (\d+)\)",
                                                err.read_text())]
            return pids if len(pids) == 40 else None

        pids = wait_for(started, DEADLINE, message="40 plugins to start")
        tracker.add(*pids)
        assert "could not start" not in err.read_text()
        assert "raised this process's open files limit from 64 to 1024" in err.read_text()
        assert {proc_limit(pid, "Max open files")[0] for pid in pids} == {"64"}
    finally:
        proc.terminate()
        proc.wait(timeout=20)
