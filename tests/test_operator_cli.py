"""The operator's command line: each mistake is one clear line and an exit status a script can
use; --version and plain-text help; stop feedback and a second Ctrl-C; ``list --all`` and CRLF
scripts; demo commands that can share a host; packaging metadata.  Real subprocesses and signals.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import CLI, PYTHON_IGNORES_TERM, alive, read_pids, wait_for, write_plugin

from plugin_launcher import __version__
from plugin_launcher.advice import (
    config_key_warnings,
    crlf_problem,
    did_you_mean,
    option_name_warnings,
    role_advice,
)

ROOT = Path(__file__).resolve().parent.parent
IDENTITY_VARIABLES = ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS",
                      "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE",
                      "JOB_COMPLETION_INDEX")
SH = "#!/bin/bash\necho {}\n"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LMCACHE_") and k not in IDENTITY_VARIABLES}
    env.update(extra)
    return env


def cli(*args: str, cwd: Path | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env=clean_env(), cwd=cwd, stdin=subprocess.DEVNULL)


def warnings_of(stderr: str) -> list[str]:
    return [line.split(" WARNING ", 1)[1] for line in stderr.splitlines() if " WARNING " in line]


def errors_of(stderr: str) -> list[str]:
    return [line.split(" ERROR ", 1)[1] for line in stderr.splitlines() if " ERROR " in line]


# --------------------------------------------------------------------------- the pure rules
@pytest.mark.parametrize(("word", "choices", "expected"), [
    ("plugin_location", ["plugin_locations", "extra_config"], "plugin_locations"),
    ("extra_configs", ["plugin_locations", "extra_config"], "extra_config"),
    ("SCHEDULAR", ["SCHEDULER", "WORKER"], "SCHEDULER"),
    ("workers", ["SCHEDULER", "WORKER"], "WORKER"),
    ("Worker", ["SCHEDULER", "WORKER"], None),  # the same word: not a near miss
    ("chunk_size", ["plugin_locations", "extra_config"], None),
    ("prefill", ["SCHEDULER", "WORKER"], None),
    ("all_heartbeat", ["all_heartbeat.py", "all_plugin.sh"], "all_heartbeat.py"),
    ("x", [], None),
])
def test_did_you_mean(word: str, choices: list[str], expected: str | None) -> None:
    assert did_you_mean(word, choices) == expected


def test_config_key_warnings_only_for_near_misses_of_our_keys() -> None:
    data = {"plugin_location": ["p"], "watch_plugin": True, "chunk_size": 256,
            "local_cpu": True, "extra_config": {}, "runtime_plugin_location": ["r"]}
    assert config_key_warnings(data, "c.yaml") == [
        "c.yaml: unknown key 'plugin_location' (kept and passed to plugins); "
        "did you mean plugin_locations?",
        "c.yaml: unknown key 'watch_plugin' (kept and passed to plugins); "
        "did you mean watch_plugins?",
        "c.yaml: unknown key 'runtime_plugin_location' (kept and passed to plugins); "
        "did you mean runtime_plugin_locations?",
    ]


def test_option_name_and_role_advice() -> None:
    names = ["all_heartbeat.py", "prefill_x.sh", "worker_0_y.sh"]
    assert option_name_warnings(["all_heartbeat.py", "all_heartbeat", "zzz"], names) == [
        "plugin_options.all_heartbeat: no plugin named 'all_heartbeat' was found; "
        "did you mean all_heartbeat.py?",
        "plugin_options.zzz: no plugin named 'zzz' was found",
    ]
    assert role_advice("scheduler", names) == (None, None)
    assert role_advice("prefill", names) == (None, None)  # named by a file
    assert role_advice("schedular", names) == (
        "--role schedular: no plugin targets role SCHEDULAR; did you mean scheduler?", None)
    assert role_advice("prefil", names)[0] == (
        "--role prefil: no plugin targets role PREFIL; did you mean prefill?")
    error, warning = role_advice("decode", names)
    assert error is None and warning is not None and "only all_* plugins apply" in warning


@pytest.mark.parametrize(("name", "head", "warned"), [
    ("all_x.sh", b"#!/bin/bash\r\necho hi\r\n", True),
    ("all_x.sh", b"echo hi\r\n", True),  # no shebang: bash still chokes
    ("all_x.sh", b"#!/bin/bash\necho 'a\rb'\n", False),  # a lone \r is data
    ("all_x.py", b"#!/usr/bin/env python3\r\nprint(1)\r\n", True),
    ("all_x.py", b"print(1)\r\n", False),  # Python reads CRLF source fine
    ("all_x.sh", b"#!/bin/bash\necho hi\n", False),
])
def test_crlf_problem(name: str, head: bytes, warned: bool) -> None:
    problem = crlf_problem(name, head)
    assert (problem is not None) == warned
    if problem is not None:
        assert problem.startswith(f"{name}: has Windows (CRLF) line endings")
        assert "dos2unix" in problem


# ------------------------------------------------------------------------------ mistakes
@pytest.mark.parametrize("action", ["run", "list"])
def test_a_misspelled_role_is_exit_2_with_did_you_mean(action: str, plugin_dir: Path) -> None:
    write_plugin(plugin_dir, "all_x.sh", SH.format("must not run"))
    write_plugin(plugin_dir, "scheduler_y.sh", SH.format("scheduler"))
    result = cli(action, "--role", "schedular", "--plugin-location", str(plugin_dir))
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: --role schedular: no plugin targets role SCHEDULAR; did you mean scheduler?"]


def test_a_role_named_by_no_file_warns_and_runs_the_all_plugins(plugin_dir: Path) -> None:
    write_plugin(plugin_dir, "all_x.sh", SH.format("x"))
    result = cli("run", "--role", "prefill", "--plugin-location", str(plugin_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[all_x.sh] x\n"
    assert [w for w in warnings_of(result.stderr) if w.startswith("--role prefill: ")] == [
        "--role prefill: no plugin file names role PREFILL, only all_* plugins apply "
        "(roles named: SCHEDULER, WORKER)"]


def test_a_misspelled_config_key_is_named_and_nothing_to_run_is_exit_1(tmp_path: Path,
                                                                          plugin_dir: Path) -> None:
    write_plugin(plugin_dir, "all_x.sh", SH.format("x"))
    config = tmp_path / "lmcache.yaml"
    config.write_text(f"plugin_location: [{plugin_dir}]\nchunk_size: 256\n")
    result = cli("run", "--role", "worker", "--config", str(config))
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    warnings = warnings_of(result.stderr)
    assert f"{config}: unknown key 'plugin_location' (kept and passed to plugins); did you mean " \
           "plugin_locations?" in warnings
    assert f"{config}: no plugin location configured (add plugin_locations, or use " \
           "--plugin-location)" in warnings
    assert "use --config" not in result.stderr, "--config was given"
    assert not [w for w in warnings if "chunk_size" in w], "an LMCache key of its own is fine"
    assert errors_of(result.stderr) == ["nothing to run: no plugin location configured"]


@pytest.mark.parametrize("action", ["run", "list"])
def test_plugin_options_for_a_plugin_that_does_not_exist_warns(action: str, tmp_path: Path,
                                                               plugin_dir: Path) -> None:
    write_plugin(plugin_dir, "all_heartbeat.sh", SH.format("beat"))
    config = tmp_path / "lmcache.yaml"
    config.write_text(f"plugin_locations: [{plugin_dir}]\n"
                      "plugin_options:\n  all_heartbeat: {restart: always}\n")
    result = cli(action, "--role", "worker", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert warnings_of(result.stderr) == [
        "plugin_options.all_heartbeat: no plugin named 'all_heartbeat' was found; "
        "did you mean all_heartbeat.sh?"]


@pytest.mark.parametrize("action", ["run", "list"])
def test_a_missing_location_names_its_absolute_path_and_nothing_to_run_is_exit_1(
        action: str, tmp_path: Path) -> None:
    result = cli(action, "--role", "worker", "--plugin-location", "plugnis", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert f"plugnis (resolved to {tmp_path / 'plugnis'}): plugin location not usable: " \
           "No such file or directory" in warnings_of(result.stderr)
    if action == "run":
        assert errors_of(result.stderr) == ["nothing to run: no plugin file found in plugnis"]


def test_every_plugin_refused_is_exit_1_saying_why(plugin_dir: Path) -> None:
    write_plugin(plugin_dir, "all_a.sh", SH.format("a"), mode=0o777)
    write_plugin(plugin_dir, "worker_b.sh", SH.format("b"), mode=0o777)
    write_plugin(plugin_dir, "scheduler_c.sh", SH.format("c"))
    result = cli("run", "--role", "worker", "--plugin-location", str(plugin_dir))
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    errors = errors_of(result.stderr)
    assert errors[-1] == ("nothing to run: every plugin for role WORKER, worker 0 was refused "
                          "(2; see the errors above, or --allow-insecure)")
    assert len(errors) == 3  # one per refused plugin, then why nothing runs


def test_no_plugin_for_this_worker_is_exit_1_and_list_says_so_too(plugin_dir: Path) -> None:
    write_plugin(plugin_dir, "worker_1_only.sh", SH.format("one"))
    args = ["--role", "worker", "--worker-id", "0", "--worker-count", "2",
            "--plugin-location", str(plugin_dir)]
    ran = cli("run", *args)
    assert ran.returncode == 1, ran.stderr
    assert errors_of(ran.stderr) == [
        "nothing to run: no plugin targets role WORKER, worker 0 (1 found; see plugin-launcher "
        "list)"]
    listed = cli("list", *args)
    assert listed.returncode == 1, listed.stderr
    assert "skip" in listed.stdout and "targets worker 1" in listed.stdout
    assert cli("list", "--json", *args).returncode == 1
    elsewhere = cli("list", "--role", "worker", "--worker-id", "1", "--worker-count", "2",
                    "--plugin-location", str(plugin_dir))
    assert elsewhere.returncode == 0, elsewhere.stderr


def test_wrap_mode_runs_the_command_even_when_no_plugin_is_selected(plugin_dir: Path) -> None:
    write_plugin(plugin_dir, "scheduler_x.sh", SH.format("x"))
    result = cli("run", "--role", "worker", "--plugin-location", str(plugin_dir),
                 "--", sys.executable, "-c", "print('served'); raise SystemExit(3)")
    assert result.returncode == 3, result.stderr
    assert result.stdout == "served\n"
    assert [w for w in warnings_of(result.stderr) if w.startswith("nothing to run yet: ")] == [
        "nothing to run yet: no plugin targets role WORKER, worker 0 (1 found; see "
        f"plugin-launcher list); running {sys.executable} anyway"]


# --------------------------------------------------------------------------- version, help
def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"plugin-launcher {__version__}\n"


def test_bare_command_prints_the_usage_with_examples_and_exit_2() -> None:
    result = cli()
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("usage: plugin-launcher")
    assert "examples:\n  plugin-launcher list --role scheduler" in result.stderr
    assert "required: action" not in result.stderr


def test_options_without_an_action_say_which_actions_exist() -> None:
    result = cli("--allow-insecure")
    assert result.returncode == 2
    assert result.stderr == ("error: missing action: run, list or ctl "
                             "(see plugin-launcher --help)\n")


@pytest.mark.parametrize("action", [[], ["run"], ["list"]], ids=["top", "run", "list"])
def test_help_is_plain_text_with_examples(action: list[str]) -> None:
    result = cli(*action, "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "``" not in text and ":func:" not in text, "no reStructuredText markup"
    examples = re.findall(r"^  plugin-launcher .+$", text.split("examples:\n", 1)[1],
                          re.MULTILINE)
    assert 2 <= len(examples) <= 3, text
    for example in examples:  # every example is a command line the parser accepts
        argv = shlex.split(example)[1:]
        if "--" in argv:
            argv = argv[:argv.index("--")]
        if action:
            assert argv[0] == action[0]
        from plugin_launcher.cli import build_parser

        build_parser().parse_args(argv)


# ----------------------------------------------------------------------------- stop feedback
@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_shows_what_it_waits_for_and_a_second_signal_kills_now(
        second: signal.Signals, plugin_dir: Path, tmp_path: Path, tracker: Any) -> None:
    write_plugin(plugin_dir, "all_ignores_term.py", PYTHON_IGNORES_TERM)
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    err_path = tmp_path / "stderr"
    stop_timeout = 60.0  # the second signal must not wait for this
    with open(err_path, "w") as err:
        proc = tracker.popen(
            [*CLI, "run", "--role", "worker", "--plugin-location", str(plugin_dir),
             "--stop-timeout", str(stop_timeout)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            env=clean_env(PID_DIR=str(pid_dir)), start_new_session=True)
    pids_file = pid_dir / "all_ignores_term.py.pids"
    pids = wait_for(lambda: read_pids(pids_file), 15, message="the plugin to report its PIDs")
    tracker.add(*pids)
    proc.send_signal(signal.SIGINT)
    waiting = re.compile(rf"waiting for plugin all_ignores_term\.py \(pid {pids[0]}\), "
                         r"SIGKILL in (\d+\.\d)s$")
    lines = wait_for(lambda: [m for line in err_path.read_text().splitlines()
                              if (m := waiting.search(line))], 15,
                     message="a 'waiting for plugin' line")
    assert 0 < float(lines[0].group(1)) < stop_timeout
    assert all(alive(p) for p in pids), "still within the stop timeout"
    start = time.monotonic()
    proc.send_signal(second)
    assert proc.wait(timeout=15) == 0
    assert time.monotonic() - start < 10, "killed at once, not after the stop timeout"
    assert not [p for p in pids if alive(p)], "every plugin process is gone"
    stderr = err_path.read_text()
    assert "second signal: killing remaining plugins now" in stderr
    assert "plugin all_ignores_term.py stopped (killed by SIGKILL)" in stderr


# ------------------------------------------------------------------------- list --all, CRLF
def test_list_all_shows_ignored_files_and_why(plugin_dir: Path) -> None:
    write_plugin(plugin_dir, "all_ok.sh", SH.format("ok"))
    write_plugin(plugin_dir, "all_notes.txt", "notes\n")
    write_plugin(plugin_dir, "README", "readme\n")
    write_plugin(plugin_dir, ".all_hidden.sh", SH.format("hidden"))
    write_plugin(plugin_dir, "__pycache__/all_ok.cpython-311.pyc", "")
    os.mkfifo(plugin_dir / "all_fifo.sh")
    expected = {
        "all_notes.txt": "extension .txt",
        "README": "no extension",
        ".all_hidden.sh": "hidden",
        "__pycache__/all_ok.cpython-311.pyc": "in __pycache__",
        "all_fifo.sh": "not a regular file",
    }
    args = ["--role", "worker", "--plugin-location", str(plugin_dir)]
    plain = cli("list", *args)
    assert plain.returncode == 0, plain.stderr
    assert not [line for line in plain.stdout.splitlines() if line.startswith("ignore")]
    assert "5 other files ignored (--all shows them)" in plain.stdout

    listed = cli("list", "--all", *args)
    assert listed.returncode == 0, listed.stderr
    ignored = {}
    for line in listed.stdout.splitlines():
        if line.startswith("ignore "):
            name, reason = line[len("ignore "):].strip().split("  ", 1)
            ignored[name] = reason.strip()
    assert ignored == expected
    assert re.search(r"^run +all_ok\.sh ", listed.stdout, re.MULTILINE)

    as_json = cli("list", "--all", "--json", *args)
    entries = {e["name"]: e for e in json.loads(as_json.stdout)}
    assert {n: e["reason"] for n, e in entries.items() if e.get("ignored")} == expected
    assert entries["all_ok.sh"]["selected"] and not entries["all_fifo.sh"]["selected"]
    ran = cli("run", *args)  # run is not affected by what list --all shows
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "[all_ok.sh] ok\n"


def test_a_crlf_shell_plugin_is_warned_about_in_list_and_run(plugin_dir: Path) -> None:
    path = write_plugin(plugin_dir, "all_crlf.sh", "#!/bin/bash\r\nsleep 0.1\r\necho done\r\n")
    message = (f"{path}: has Windows (CRLF) line endings; bash will see '\\r' at the end of each "
               "line; convert it with dos2unix")
    args = ["--role", "worker", "--plugin-location", str(plugin_dir)]
    listed = cli("list", *args)
    assert f"warning: {message}" in listed.stdout
    ran = cli("run", *args)
    assert message in warnings_of(ran.stderr)


# ---------------------------------------------------------------------- demo and packaging
def demo_commands() -> list[list[str]]:
    """The commands examples/lmcache.yaml suggests, as argument lists after the program."""
    text = (ROOT / "examples" / "lmcache.yaml").read_text()
    return [shlex.split(m)[1:] for m in re.findall(r"^#\s+(plugin-launcher run .+)$", text,
                                                   re.MULTILINE)]


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def test_the_demo_commands_run_together_on_one_host(tmp_path: Path, tracker: Any) -> None:
    pytest.importorskip("psutil")
    commands = demo_commands()
    assert len(commands) >= 2
    if not all(port_free(p) for p in range(9400, 9400 + len(commands) + 1)):
        pytest.skip("the demo's metrics ports are taken on this machine")
    exporting = re.compile(r"\[all_metrics_reporter\.py\] exporting metrics of PID (\d+) on "
                           r"http://0\.0\.0\.0:(\d+)/metrics")
    runs = []
    for i, args in enumerate(commands):
        out_path = tmp_path / f"demo{i}.out"
        with open(out_path, "w") as out:
            proc = tracker.popen([*CLI, *args], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, env=clean_env())
        runs.append((proc, out_path))
    try:
        ports = []
        for proc, out_path in runs:
            found = wait_for(lambda p=out_path: exporting.search(p.read_text())
                             or "cannot listen" in p.read_text(), 20,
                             message=f"the metrics exporter of {out_path.name}")
            assert found is not True, out_path.read_text()
            assert int(found.group(1)) == proc.pid
            ports.append(int(found.group(2)))
        assert len(set(ports)) == len(ports), ports
    finally:
        for proc, _ in runs:
            proc.send_signal(signal.SIGINT)
        for proc, out_path in runs:
            assert proc.wait(timeout=20) == 0, out_path.read_text()


def test_the_package_license_is_an_spdx_string() -> None:
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["project"]["license"] == "Apache-2.0"
    [setuptools] = [r for r in data["build-system"]["requires"] if r.startswith("setuptools")]
    assert setuptools == "setuptools>=77", "SPDX license strings need setuptools 77"
