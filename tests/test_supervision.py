"""Supervision with real processes: restart policies, max_restarts, backoff, timeouts, status,
logging of restarts, per-plugin options, CLI exit codes and a restart storm's CPU cost.

Plugins are small shell scripts that append one line per run to a file ("<pid> <start time>"), so
a test sees exactly which runs happened and when, the way an operator would from the outside.
"""

from __future__ import annotations

import logging
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from helpers import CLI, alive, read_pids, wait_for, wait_gone, write_plugin

from plugin_launcher import PluginLauncher

Caplog = pytest.LogCaptureFixture
Launchers = list[PluginLauncher]
SUPERVISOR_LOG = "plugin_launcher.supervisor"
RESTART_LINE = re.compile(r"plugin (\S+) .*; restarting in ([0-9.]+)s \(restart (\d+)")


# ------------------------------------------------------------------------------------ helpers
def counting_plugin(folder: Path, name: str, runs: Path, body: str) -> Path:
    """A plugin that appends "<pid> <epoch seconds>" to ``runs`` on every start, then ``body``."""
    text = (
        "#!/bin/sh\n"
        f'echo "$$ $(date +%s.%N)" >> {shlex.quote(str(runs))}\n'
        f"{body}\n"
    )
    return write_plugin(folder, name, text)


def run_lines(runs: Path) -> list[tuple[int, float]]:
    try:
        text = runs.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        pid, stamp = line.split()
        out.append((int(pid), float(stamp)))
    return out


def start(plugin_dir: Path, launchers: list[PluginLauncher], options: dict[str, Any],
          **kwargs: Any) -> PluginLauncher:
    config = {"plugin_locations": [str(plugin_dir)], "plugin_options": options}
    launcher = PluginLauncher(config, "worker", worker_id=0, worker_count=1, **kwargs)
    launchers.append(launcher)
    launcher.launch_plugins()
    return launcher


def by_name(launcher: PluginLauncher) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in launcher.status()}


def supervisor_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in list(caplog.records) if r.name == SUPERVISOR_LOG]


def restart_lines(caplog: pytest.LogCaptureFixture, name: str) -> list[re.Match[str]]:
    found = [RESTART_LINE.search(m) for m in supervisor_messages(caplog)]
    return [m for m in found if m is not None and m.group(1) == name]


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="plugin_launcher")


FAST = {"backoff": {"initial": 0.05, "max": 0.1}, "stop_timeout": 1}


# ------------------------------------------------------------------------- restart policies
@pytest.mark.parametrize(
    ("policy", "code", "runs", "state", "restarts"),
    [
        ("never", 1, 1, "exited", 0),
        ("never", 0, 1, "exited", 0),
        ("on-failure", 1, 3, "failed", 2),
        ("on-failure", 0, 1, "exited", 0),
        ("always", 1, 3, "failed", 2),
        ("always", 0, 3, "failed", 2),  # clean exits count toward max_restarts under always
    ],
)
def test_restart_policy_decides_which_runs_happen(
    plugin_dir: Path, tmp_path: Path, launchers: Launchers, caplog: Caplog,
    policy: str, code: int, runs: int, state: str, restarts: int,
) -> None:
    log_file = tmp_path / "runs"
    counting_plugin(plugin_dir, "all_p.sh", log_file, f"exit {code}")
    launcher = start(plugin_dir, launchers,
                     {"default": {**FAST, "restart": policy, "max_restarts": 2}})
    assert launcher.wait(timeout=15), "the launcher should settle once the policy gives up"
    assert len(run_lines(log_file)) == runs
    entry = by_name(launcher)["all_p.sh"]
    assert entry["state"] == state
    assert entry["restarts"] == restarts
    assert entry["exit_code"] == code
    assert len(restart_lines(caplog, "all_p.sh")) == restarts
    if state == "failed":
        assert any("all_p.sh" in m and "giving up after 2 restarts" in m
                   for m in supervisor_messages(caplog))


def test_max_restarts_then_failed(
    plugin_dir: Path, tmp_path: Path, launchers: Launchers, caplog: Caplog,
) -> None:
    log_file = tmp_path / "runs"
    counting_plugin(plugin_dir, "all_crash.sh", log_file, "echo boom >&2; exit 7")
    launcher = start(plugin_dir, launchers,
                     {"default": {**FAST, "restart": "on-failure", "max_restarts": 3}})
    assert launcher.wait(timeout=15)
    pids = [pid for pid, _ in run_lines(log_file)]
    assert len(pids) == 4 and len(set(pids)) == 4, "1 run + 3 restarts, each a new process"
    (plugin,) = launcher.plugins
    assert plugin.state == "failed"
    assert plugin.restarts == 3
    assert plugin.last_returncode == 7
    entry = launcher.status()[0]
    assert (entry["state"], entry["restarts"], entry["exit_code"]) == ("failed", 3, 7)
    # the restart numbers are logged as "restart 1 of 3", ...
    assert [m.group(3) for m in restart_lines(caplog, "all_crash.sh")] == ["1", "2", "3"]
    wait_gone(pids)


# -------------------------------------------------------------------------------- backoff
def test_backoff_doubles_up_to_max_with_jitter(
    plugin_dir: Path, tmp_path: Path, launchers: Launchers, caplog: Caplog,
) -> None:
    log_file = tmp_path / "runs"
    counting_plugin(plugin_dir, "all_flap.sh", log_file, "exit 1")
    launcher = start(plugin_dir, launchers, {"default": {
        "restart": "on-failure", "max_restarts": 5, "backoff": {"initial": 0.1, "max": 0.4},
    }})
    assert launcher.wait(timeout=20)
    stamps = [t for _, t in run_lines(log_file)]
    assert len(stamps) == 6
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    bases = [0.1, 0.2, 0.4, 0.4, 0.4]  # doubling from initial, capped at max
    logged = [float(m.group(2)) for m in restart_lines(caplog, "all_flap.sh")]
    assert len(logged) == 5
    for base, delay, gap in zip(bases, logged, gaps, strict=True):
        # the announced delay is base * jitter(0.8..1.0), printed with one decimal
        assert 0.8 * base - 0.05 <= delay <= base + 0.05, (bases, logged)
        # the measured gap is the delay plus the (small) cost of exiting and starting again
        assert 0.8 * base - 0.01 <= gap <= base + 0.35, (bases, gaps)
    # it really grows: the last capped gaps are clearly longer than the first one
    assert min(gaps[2:]) > gaps[0] + 0.15, gaps


def test_backoff_resets_after_a_long_enough_run(
    plugin_dir: Path, tmp_path: Path, launchers: Launchers, caplog: Caplog,
) -> None:
    log_file = tmp_path / "runs"
    counting_plugin(plugin_dir, "all_slowcrash.sh", log_file, "sleep 0.3; exit 1")
    launcher = start(plugin_dir, launchers, {"default": {
        "restart": "on-failure", "max_restarts": 3,
        "backoff": {"initial": 0.2, "max": 5, "reset": 0.25},
    }})
    assert launcher.wait(timeout=20)
    assert len(run_lines(log_file)) == 4
    logged = [float(m.group(2)) for m in restart_lines(caplog, "all_slowcrash.sh")]
    # every run lasted longer than backoff.reset, so every delay stays at the initial one
    assert logged and all(d <= 0.25 for d in logged), logged


# -------------------------------------------------------------------------------- timeout
def test_timeout_stops_a_sleeping_plugin_and_counts_as_failure(
    plugin_dir: Path, tmp_path: Path, launchers: Launchers, caplog: Caplog,
) -> None:
    log_file = tmp_path / "runs"
    counting_plugin(plugin_dir, "all_sleepy.sh", log_file, "exec sleep 30")
    launcher = start(plugin_dir, launchers, {"default": {
        **FAST, "restart": "on-failure", "max_restarts": 1, "timeout": 0.4,
    }})
    began = time.monotonic()
    assert launcher.wait(timeout=15)
    elapsed = time.monotonic() - began
    runs = run_lines(log_file)
    assert len(runs) == 2, "a timeout is a failure, so on-failure restarts it once"
    wait_gone([pid for pid, _ in runs])
    assert elapsed < 10, "stopped by the timeout, not by sleep ending"
    (plugin,) = launcher.plugins
    assert plugin.state == "failed"
    assert plugin.restarts == 1
    assert plugin.last_returncode == -signal.SIGTERM
    entry = launcher.status()[0]
    assert entry["signal"] == "SIGTERM"
    messages = supervisor_messages(caplog)
    exits = [m for m in messages if "all_sleepy.sh" in m and "(timed out after 0.4s)" in m]
    assert len(exits) == 2, messages


def test_timeout_with_restart_never_ends_as_a_failure(
    plugin_dir: Path, tmp_path: Path, launchers: list[PluginLauncher],
) -> None:
    log_file = tmp_path / "runs"
    counting_plugin(plugin_dir, "all_sleepy.sh", log_file, "exec sleep 30")
    launcher = start(plugin_dir, launchers, {"default": {**FAST, "timeout": 0.3}})
    assert launcher.wait(timeout=10)
    ((pid, _),) = run_lines(log_file)
    assert not alive(pid)
    (plugin,) = launcher.plugins
    assert plugin.state == "exited"
    assert plugin.last_failure


# --------------------------------------------------------------------------------- status
def test_status_fields_while_running_and_after(
    plugin_dir: Path, tmp_path: Path, launchers: list[PluginLauncher],
) -> None:
    go = tmp_path / "go"
    log_file = tmp_path / "runs"
    counting_plugin(
        plugin_dir, "all_stat.sh", log_file,
        "echo one; echo two; echo three >&2\n"
        f"while [ ! -e {shlex.quote(str(go))} ]; do sleep 0.02; done\n"
        "echo four\nexit 4",
    )
    before = time.time()
    launcher = start(plugin_dir, launchers, {"default": FAST})
    wait_for(lambda: by_name(launcher)["all_stat.sh"]["output_lines"] == 3, 10,
             message="three output lines counted")
    ((pid, _),) = run_lines(log_file)
    entry = by_name(launcher)["all_stat.sh"]
    assert entry["pid"] == pid and alive(pid)
    assert entry["state"] == "running"
    assert entry["path"] == str(plugin_dir / "all_stat.sh")
    assert entry["restarts"] == 0
    assert entry["exit_code"] is None and entry["signal"] is None
    assert before - 1 <= entry["started_at"] <= time.time()
    started_at = entry["started_at"]

    go.touch()
    assert launcher.wait(timeout=10)
    entry = by_name(launcher)["all_stat.sh"]
    assert entry["state"] == "exited"
    assert entry["exit_code"] == 4 and entry["returncode"] == 4
    assert entry["signal"] is None
    assert entry["pid"] == pid and not alive(pid)
    assert entry["started_at"] == started_at
    assert entry["output_lines"] == 4


def test_status_reports_a_killing_signal(
    plugin_dir: Path, tmp_path: Path, launchers: list[PluginLauncher],
) -> None:
    counting_plugin(plugin_dir, "all_killed.sh", tmp_path / "runs", "kill -KILL $$")
    launcher = start(plugin_dir, launchers, {"default": FAST})
    assert launcher.wait(timeout=10)
    entry = launcher.status()[0]
    assert entry["state"] == "exited"
    assert entry["signal"] == "SIGKILL"
    assert entry["exit_code"] is None
    assert entry["returncode"] == -signal.SIGKILL


# ------------------------------------------------------------------------------ stopping
def test_stop_during_backoff_cancels_the_restart(
    plugin_dir: Path, tmp_path: Path, launchers: Launchers, caplog: Caplog,
) -> None:
    log_file = tmp_path / "runs"
    counting_plugin(plugin_dir, "all_crash.sh", log_file, "exit 1")
    # the built-in backoff (1 s, jitter 0.8-1.0) applies when none is configured
    launcher = start(plugin_dir, launchers, {"default": {"restart": "always", "max_restarts": 0}})
    wait_for(lambda: by_name(launcher)["all_crash.sh"]["state"] == "backoff", 10,
             message="the plugin to wait for its restart")
    (line,) = restart_lines(caplog, "all_crash.sh")
    assert 0.75 <= float(line.group(2)) <= 1.0
    (plugin,) = launcher.plugins
    launcher.stop_plugins(timeout=1)
    assert plugin.state == "stopped"
    assert launcher.status()[0]["state"] == "stopped"
    time.sleep(1.1)  # on purpose: longer than the pending restart's delay
    assert len(run_lines(log_file)) == 1, "no restart after the stop"


# ------------------------------------------------------------------------ restart logging
def test_each_restart_is_one_log_line(
    plugin_dir: Path, tmp_path: Path, launchers: Launchers, caplog: Caplog,
) -> None:
    counting_plugin(plugin_dir, "all_loud.sh", tmp_path / "runs", "exit 1")
    counting_plugin(plugin_dir, "all_quiet.sh", tmp_path / "runs2", "exit 0")
    launcher = start(plugin_dir, launchers, {"default": {
        **FAST, "restart": "on-failure", "max_restarts": 4}})
    assert launcher.wait(timeout=15)
    lines = [m for m in supervisor_messages(caplog) if "restarting in" in m]
    assert len([m for m in lines if "all_loud.sh" in m]) == 4
    assert not [m for m in lines if "all_quiet.sh" in m]
    # each of those lines says why and when: the exit code, the delay and the restart number
    assert all("exited with code 1" in m and "of 4)" in m for m in lines)
    levels = {r.levelno for r in caplog.records
              if r.name == SUPERVISOR_LOG and "restarting in" in r.getMessage()}
    assert levels == {logging.WARNING}


# ------------------------------------------------------------------------ option precedence
def test_per_plugin_entry_overrides_default_key_by_key(
    plugin_dir: Path, tmp_path: Path, launchers: Launchers, caplog: Caplog,
) -> None:
    counting_plugin(plugin_dir, "all_plain.sh", tmp_path / "plain", "exit 1")
    counting_plugin(plugin_dir, "all_special.sh", tmp_path / "special", "exit 1")
    launcher = start(plugin_dir, launchers, {
        "default": {"restart": "never", "max_restarts": 5, "backoff": {"initial": 0.3, "max": 1}},
        "all_special.sh": {"restart": "on-failure", "max_restarts": 1},
    })
    assert launcher.wait(timeout=15)
    assert len(run_lines(tmp_path / "plain")) == 1
    assert len(run_lines(tmp_path / "special")) == 2
    status = by_name(launcher)
    assert status["all_plain.sh"]["state"] == "exited"
    special = status["all_special.sh"]
    assert (special["state"], special["restarts"]) == ("failed", 1)
    # the entry does not set backoff, so the default's 0.3 s applies (not the built-in 1 s)
    (line,) = restart_lines(caplog, "all_special.sh")
    assert 0.2 <= float(line.group(2)) <= 0.3


# ------------------------------------------------------------------------------------ CLI
def write_config(path: Path, plugin_dir: Path, options: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"plugin_locations": [str(plugin_dir)],
                                    "plugin_options": options}))
    return path


def cli_run(tmp_path: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "run", "--role", "worker", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=tmp_path)


def test_cli_stop_timeout_overrides_default_but_not_plugin_entry(
    plugin_dir: Path, tmp_path: Path, tracker: Any,
) -> None:
    # both plugins ignore SIGTERM (sleep inherits the ignored signal), so only SIGKILL ends them
    for name in ("all_default.sh", "all_own.sh"):
        write_plugin(plugin_dir, name,
                     f"#!/bin/sh\ntrap '' TERM\necho $$ > {tmp_path / name}.pid\n"
                     "while :; do sleep 0.05; done\n")
    config = write_config(tmp_path / "c.yaml", plugin_dir, {
        "default": {"stop_timeout": 30},
        "all_own.sh": {"stop_timeout": 0.2},
    })
    proc = tracker.popen([*CLI, "run", "--role", "worker", "--config", str(config),
                          "--stop-timeout", "2"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pids = {}
    for name in ("all_default.sh", "all_own.sh"):
        pids[name] = wait_for(lambda n=name: read_pids(tmp_path / f"{n}.pid"), 10,
                              message=f"{name} to start")[0]
        tracker.add(pids[name])
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: not alive(pids["all_own.sh"]), 10, 0.01, "all_own.sh to be killed")
    own_gone = time.monotonic() - sent
    assert alive(pids["all_default.sh"]), "the --stop-timeout plugin must still be in its grace"
    wait_for(lambda: not alive(pids["all_default.sh"]), 15, 0.01, "all_default.sh to be killed")
    default_gone = time.monotonic() - sent
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert own_gone < 1.5, "the plugin's own stop_timeout (0.2 s) wins over --stop-timeout"
    assert 1.8 <= default_gone < 8, "--stop-timeout (2 s) wins over the default entry (30 s)"
    assert re.search(r"plugin all_own\.sh .*killed by SIGKILL", err)
    assert re.search(r"plugin all_default\.sh .*killed by SIGKILL", err)


@pytest.mark.parametrize(
    ("plugins", "options", "code"),
    [
        ({"all_a.sh": "exit 0", "all_b.sh": "echo hi"}, {}, 0),
        ({"all_a.sh": "exit 0", "all_b.sh": "exit 3"}, {}, 1),
        ({"all_a.sh": "exit 0", "all_b.sh": "exit 1"},
         {"all_b.sh": {"restart": "on-failure", "max_restarts": 1}}, 1),
        ({"all_a.sh": "exit 0", "all_b.sh": "exec sleep 30"}, {"all_b.sh": {"timeout": 0.3}}, 1),
    ],
    ids=["all-exit-0", "one-exits-3", "one-failed", "one-timed-out"],
)
def test_cli_run_exit_code_reflects_how_plugins_ended(
    plugin_dir: Path, tmp_path: Path, plugins: dict[str, str], options: dict[str, Any], code: int,
) -> None:
    for name, body in plugins.items():
        counting_plugin(plugin_dir, name, tmp_path / f"{name}.runs", body)
    config = write_config(tmp_path / "c.yaml", plugin_dir,
                          {"default": {**FAST}, **options})
    result = cli_run(tmp_path, "--config", str(config), "--stop-timeout", "1")
    assert result.returncode == code, result.stderr
    for name in plugins:
        pids = [pid for pid, _ in run_lines(tmp_path / f"{name}.runs")]
        assert pids and not any(alive(p) for p in pids)


def test_cli_run_exits_1_when_always_plugin_ends_failed_after_clean_exits(
    plugin_dir: Path, tmp_path: Path,
) -> None:
    counting_plugin(plugin_dir, "all_ok.sh", tmp_path / "runs", "exit 0")
    config = write_config(tmp_path / "c.yaml", plugin_dir,
                          {"default": {**FAST, "restart": "always", "max_restarts": 1}})
    result = cli_run(tmp_path, "--config", str(config))
    assert len(run_lines(tmp_path / "runs")) == 2
    assert "giving up after 1 restarts" in result.stderr
    assert result.returncode == 1, "a plugin that ends `failed` makes run exit non-zero"


# --------------------------------------------------------------------------- restart storm
def cpu_seconds(pid: int) -> float:
    """CPU time of the process itself (user + system), children excluded."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def test_restart_storm_costs_little_cpu_and_few_log_lines(
    plugin_dir: Path, tmp_path: Path, tracker: Any,
) -> None:
    count = 20
    for i in range(count):
        write_plugin(plugin_dir, f"all_storm{i:02d}.sh", "#!/bin/sh\nexit 1\n")
    # a short backoff makes it a real storm: about 15 restarts a second in all
    config = write_config(tmp_path / "c.yaml", plugin_dir, {"default": {
        "restart": "always", "max_restarts": 0, "backoff": {"initial": 0.1, "max": 1.0}}})
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err, open(tmp_path / "stdout", "w") as out:
        proc = tracker.popen([*CLI, "run", "--role", "worker", "--config", str(config),
                              "--stop-timeout", "1"], stdin=subprocess.DEVNULL,
                             stdout=out, stderr=err)
    wait_for(lambda: err_path.read_text().count("started plugin") >= count, 15,
             message="all storm plugins to start once")
    cpu_before, wall_before = cpu_seconds(proc.pid), time.monotonic()
    time.sleep(10)  # on purpose: the storm's duration
    cpu_after, wall_after = cpu_seconds(proc.pid), time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    share = (cpu_after - cpu_before) / (wall_after - wall_before)
    assert share < 0.20, f"the launcher used {share:.0%} of a core during the storm"

    lines = err_path.read_text().splitlines()
    restarts = [line for line in lines if "restarting in" in line]
    started = [int(m.group(1)) for m in re.finditer(r"started plugin \S+ \(pid (\d+)\)",
                                                    "\n".join(lines))]
    tracker.add(*started)
    assert not [p for p in started if alive(p)]
    # delays of 0.08-0.1, 0.16-0.2, 0.32-0.4, then 0.64-0.8 and 0.8-1.0 s: in the ~11 s from
    # start to stop a plugin can exit at most ~17 times; one "restarting in" line per exit
    assert count * 3 <= len(restarts) <= count * 18, len(restarts)
    assert len(started) <= count * 18
    # one line per exit and one per start, a few lines of its own: nothing else
    assert len(lines) <= 2 * len(restarts) + count + 10, lines[:40]
