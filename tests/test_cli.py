"""``python -m plugin_launcher run|list``, as a user runs it: real subprocesses, real signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    BASH_WITH_GRANDCHILD,
    CLI,
    PYTHON,
    PYTHON_IGNORES_TERM,
    alive,
    read_pids,
    safe_dir,
    wait_for,
    write_plugin,
)

STOP = 1.0
GRACE = 2.0
IDENTITY_VARIABLES = ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS",
                      "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE",
                      "JOB_COMPLETION_INDEX")


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without launcher configuration or cluster identity variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LMCACHE_") and k not in IDENTITY_VARIABLES}
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30,
        prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, *CLI, *args], capture_output=True, text=True,
                          timeout=timeout, env=env or clean_env(), stdin=subprocess.DEVNULL)


def stdout_lines(result: subprocess.CompletedProcess[str]) -> dict[str, list[str]]:
    """Each plugin's lines from run's stdout (``[name] text``)."""
    out: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        assert line.startswith("["), f"unprefixed line on stdout: {line!r}"
        name, text = line[1:].split("] ", 1)
        out.setdefault(name, []).append(text)
    return out


# The documentation's three examples plus one for worker 1 only, in miniature.
DOC_PLUGINS = {
    "scheduler_foo_plugin.py": "print('foo')\n",
    "worker_0_test.sh": "#!/bin/bash\necho test\n",
    "all_plugin.sh": "#!/bin/bash\necho plugin\n",
    "worker_1_only.sh": "#!/bin/bash\necho one\n",
}


@pytest.fixture
def doc_plugins(plugin_dir: Path) -> Path:
    for name, text in DOC_PLUGINS.items():
        write_plugin(plugin_dir, name, text)
    return plugin_dir


# ------------------------------------------------------------------------------------------ list
def test_list_shows_what_runs_where_why_and_the_command(doc_plugins: Path) -> None:
    result = cli("list", "--role", "worker", "--worker-id", "1", "--worker-count", "2",
                 "--plugin-location", str(doc_plugins))
    assert result.returncode == 0, result.stderr
    rows = {line.split()[1]: line for line in result.stdout.splitlines()
            if line.split()[:1] in (["run"], ["skip"])}
    assert set(rows) == set(DOC_PLUGINS)
    bash = "/bin/bash"  # the shebang, as written
    assert rows["all_plugin.sh"].startswith("run")
    assert "targets every role" in rows["all_plugin.sh"]
    assert f"{bash} {doc_plugins / 'all_plugin.sh'}" in rows["all_plugin.sh"]
    assert rows["worker_1_only.sh"].startswith("run")
    assert "targets role WORKER, worker 1" in rows["worker_1_only.sh"]
    assert rows["scheduler_foo_plugin.py"].startswith("skip")
    assert "targets role SCHEDULER" in rows["scheduler_foo_plugin.py"]
    assert rows["worker_0_test.sh"].startswith("skip")
    assert "targets worker 0" in rows["worker_0_test.sh"]
    for skipped in ("scheduler_foo_plugin.py", "worker_0_test.sh"):
        assert str(doc_plugins) not in rows[skipped], "no command for a plugin that does not run"

    scheduler = cli("list", "--role", "SCHEDULER", "--plugin-location", str(doc_plugins))
    rows = {line.split()[1]: line for line in scheduler.stdout.splitlines()
            if line.split()[:1] in (["run"], ["skip"])}
    assert rows["scheduler_foo_plugin.py"].startswith("run")
    assert f"{PYTHON} {doc_plugins / 'scheduler_foo_plugin.py'}" in \
        rows["scheduler_foo_plugin.py"]
    assert "targets role WORKER" in rows["worker_1_only.sh"]


def test_list_json(doc_plugins: Path) -> None:
    result = cli("list", "--json", "--role", "worker", "--worker-id", "0",
                 "--plugin-location", str(doc_plugins))
    assert result.returncode == 0, result.stderr
    entries = {e["name"]: e for e in json.loads(result.stdout)}
    assert set(entries) == set(DOC_PLUGINS)
    for name, entry in entries.items():
        assert {"name", "path", "selected", "reason", "command", "error"} <= set(entry)
        assert entry["path"] == str(doc_plugins / name)
        assert isinstance(entry["selected"], bool)
        assert entry["error"] is None
    assert {n for n, e in entries.items() if e["selected"]} == {"all_plugin.sh",
                                                                 "worker_0_test.sh"}
    assert entries["worker_0_test.sh"]["command"] == ["/bin/bash",
                                                      str(doc_plugins / "worker_0_test.sh")]
    assert entries["worker_1_only.sh"] == {**entries["worker_1_only.sh"], "selected": False,
                                           "reason": "targets worker 1", "command": None}
    assert entries["scheduler_foo_plugin.py"]["reason"] == "targets role SCHEDULER"
    assert entries["scheduler_foo_plugin.py"]["command"] is None


def test_environment_wins_over_file_then_plugin_location_adds(tmp_path: Path) -> None:
    """LMCache's precedence: the file, then each LMCACHE_* variable that is set, key by key;
    --plugin-location adds to the result."""
    from_file = safe_dir(tmp_path / "from_file")
    from_flag = safe_dir(tmp_path / "from_flag")
    from_env = safe_dir(tmp_path / "from_env")
    write_plugin(from_file, "all_file.sh", "#!/bin/bash\necho file\n")
    write_plugin(from_flag, "all_flag.sh", "#!/bin/bash\necho flag\n")
    write_plugin(from_env, "all_env.sh", "#!/bin/bash\necho env\n")
    config = tmp_path / "lmcache.yaml"
    config.write_text(f"plugin_locations:\n  - {from_file}\nextra_config:\n  key: value\n")
    env = clean_env(LMCACHE_PLUGIN_LOCATIONS=str(from_env))

    listed = cli("list", "--json", "--config", str(config), "--role", "worker",
                 "--plugin-location", str(from_flag), env=env)
    assert listed.returncode == 0, listed.stderr
    assert [e["name"] for e in json.loads(listed.stdout)] == ["all_env.sh", "all_flag.sh"]

    ran = cli("run", "--config", str(config), "--role", "worker",
              "--plugin-location", str(from_flag), env=env)
    assert ran.returncode == 0, ran.stderr
    assert stdout_lines(ran) == {"all_env.sh": ["env"], "all_flag.sh": ["flag"]}
    without = cli("list", "--json", "--config", str(config), "--role", "worker",
                  env=clean_env())
    assert [e["name"] for e in json.loads(without.stdout)] == ["all_file.sh"]

    only_env = cli("list", "--json", "--role", "worker", env=env)  # no file: env is used
    assert [e["name"] for e in json.loads(only_env.stdout)] == ["all_env.sh"]


# ------------------------------------------------------------------------------------------- run
def test_run_exits_0_when_every_plugin_exits_0(doc_plugins: Path) -> None:
    result = cli("run", "--role", "worker", "--worker-id", "0",
                 "--plugin-location", str(doc_plugins))
    assert result.returncode == 0, result.stderr
    assert stdout_lines(result) == {"all_plugin.sh": ["plugin"], "worker_0_test.sh": ["test"]}


def test_run_exits_1_when_a_plugin_fails(doc_plugins: Path) -> None:
    write_plugin(doc_plugins, "worker_broken.sh", "#!/bin/bash\necho broken\nexit 7\n")
    result = cli("run", "--role", "worker", "--plugin-location", str(doc_plugins))
    assert result.returncode == 1, result.stderr
    assert stdout_lines(result)["worker_broken.sh"] == ["broken"]
    assert stdout_lines(result)["all_plugin.sh"] == ["plugin"], "the others still ran"
    assert "exited with code 7" in result.stderr




@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_run_stops_every_plugin_on_a_signal_and_exits_0(sig: signal.Signals, plugin_dir: Path,
                                                         tmp_path: Path, tracker: Any) -> None:
    write_plugin(plugin_dir, "worker_grandchild.sh", BASH_WITH_GRANDCHILD)
    write_plugin(plugin_dir, "all_ignores_term.py", PYTHON_IGNORES_TERM)
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    proc = tracker.popen(
        [*CLI, "run", "--role", "worker", "--plugin-location", str(plugin_dir),
         "--stop-timeout", str(STOP)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=clean_env(PID_DIR=str(pid_dir)), start_new_session=True,
    )
    pids = wait_for(lambda: len(list(pid_dir.glob("*.pids"))) == 2 and
                    [p for f in sorted(pid_dir.glob("*.pids")) for p in read_pids(f)],
                    15, message="both plugins to report their PIDs")
    tracker.add(*pids)
    assert len(pids) == 4 and all(alive(p) for p in pids)
    start = time.monotonic()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=STOP + GRACE + 5)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, stderr
    left = [p for p in pids if alive(p)]
    assert not left, f"plugin processes {left} outlived run"
    assert elapsed < STOP + GRACE
    assert f"{sig.name}: stopping plugins" in stderr


# ------------------------------------------------------------------------------------- bad input
def bad_input_cases(tmp_path: Path, plugin_dir: Path) -> dict[str, tuple[list[str], list[str]]]:
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("plugin_locations: [a, b\nextra_config: {\n")
    location = ["--plugin-location", str(plugin_dir)]
    return {
        # case: (arguments after the action, substrings the error line must contain)
        "missing-config": (["--config", str(tmp_path / "missing.yaml"), "--role", "worker"],
                           ["missing.yaml"]),
        "malformed-yaml": (["--config", str(malformed), "--role", "worker"],
                           ["malformed.yaml", "YAML"]),
        "role-with-underscore": ([*location, "--role", "my_role"], ["--role", "my_role"]),
        "negative-worker-id": ([*location, "--role", "worker", "--worker-id", "-2"],
                               ["--worker-id"]),
        "non-numeric-worker-count": ([*location, "--role", "worker", "--worker-count", "two"],
                                     ["--worker-count", "two"]),
        "auto-without-identity": ([*location, "--role", "worker", "--worker-id", "auto"],
                                  ["RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK",
                                   "JOB_COMPLETION_INDEX"]),
    }


BAD_CASES = ["missing-config", "malformed-yaml", "role-with-underscore", "negative-worker-id",
             "non-numeric-worker-count", "auto-without-identity"]


@pytest.mark.parametrize("action", ["run", "list"])
@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_error_line_and_exit_2(case: str, action: str, tmp_path: Path,
                                                 plugin_dir: Path) -> None:
    write_plugin(plugin_dir, "all_never.sh", "#!/bin/bash\necho must not run\n")
    args, expected = bad_input_cases(tmp_path, plugin_dir)[case]
    result = cli(action, *args)
    assert result.returncode == 2
    assert result.stdout == "", "nothing ran and nothing was listed"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line, got: {result.stderr!r}"
    assert lines[0].startswith("error: ")
    for text in expected:
        assert text in lines[0]


# ------------------------------------------------------------------------ plugins that cannot run
def test_an_unknown_shebang_interpreter_falls_back_with_a_warning(plugin_dir: Path) -> None:
    write_plugin(plugin_dir, "worker_good.sh", "#!/bin/bash\necho good\n")
    write_plugin(plugin_dir, "worker_zsh.sh", "#!/nonexistent/zsh\necho fell back\n")
    result = cli("run", "--role", "worker", "--plugin-location", str(plugin_dir))
    assert result.returncode == 0, result.stderr
    assert stdout_lines(result) == {"worker_good.sh": ["good"], "worker_zsh.sh": ["fell back"]}
    [warning] = [x for x in result.stderr.splitlines() if "/nonexistent/zsh" in x]
    assert " WARNING " in warning and "worker_zsh.sh" in warning


def _cannot_run_setup(kind: str, plugin_dir: Path, tmp_path: Path) -> tuple[list[str], str,
                                                                            tuple[str, ...]]:
    """Create a plugin that cannot run; return (extra args, its name, command prefix)."""
    if kind == "unknown-interpreter":  # no fallback: a file given directly, not .py or .sh
        tool = write_plugin(tmp_path / "tools", "worker_tool.rb", "#!/nonexistent/ruby\nputs 1\n")
        return ["--plugin-location", str(tool)], "worker_tool.rb", ()
    if kind == "unreadable":
        write_plugin(plugin_dir, "worker_secret.sh", "#!/bin/bash\necho secret\n", mode=0o000)
        prefix: tuple[str, ...] = ()
        if os.geteuid() == 0:  # root reads anything: take that power away from the launcher
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root and setpriv is not installed")
            prefix = (setpriv, "--bounding-set", "-dac_override,-dac_read_search")
        return [], "worker_secret.sh", prefix
    fake = tmp_path / "fake-interpreter"  # executable, but not a program the kernel can run
    fake.write_text("this is not an executable format\n")
    fake.chmod(0o755)
    write_plugin(plugin_dir, "worker_exec.sh", f"#!{fake}\necho never\n")
    return [], "worker_exec.sh", ()


@pytest.mark.parametrize("kind", [
    "unknown-interpreter",
    "unreadable",
    "exec-error",
])
def test_a_plugin_that_cannot_run_is_one_line_and_the_others_run(
        kind: str, plugin_dir: Path, tmp_path: Path) -> None:
    write_plugin(plugin_dir, "worker_good.sh", "#!/bin/bash\necho good\n")
    extra, name, prefix = _cannot_run_setup(kind, plugin_dir, tmp_path)
    result = cli("run", "--role", "worker", "--plugin-location", str(plugin_dir), *extra,
                 prefix=prefix)
    assert stdout_lines(result) == {"worker_good.sh": ["good"]}, "the other plugin still ran"
    assert result.returncode == 1, result.stderr
    about = [x for x in result.stderr.splitlines() if name in x]
    assert len(about) == 1, f"expected one line about {name}: {about}"
    assert " ERROR " in about[0]


# --------------------------------------------------------------------------------- list vs run
SELECTION = {
    "all_a.sh": True,
    "worker_b.py": True,
    "worker_0_c.sh": False,
    "worker_1_d.sh": True,
    "scheduler_e.sh": False,
    "sub/worker_f.sh": True,
    "sub/deeper/all_g.py": True,
    "WORKER_h.sh": True,
    ".hidden_worker.sh": False,
    "__pycache__/worker_i.py": False,
    "worker_notes.txt": False,
}


@pytest.mark.parametrize(("role", "worker_id"), [("worker", "1"), ("scheduler", "0")])
def test_list_and_run_select_the_same_plugins(role: str, worker_id: str,
                                              plugin_dir: Path) -> None:
    for name in SELECTION:
        if name.endswith(".py"):
            write_plugin(plugin_dir, name, "print('ran')\n")
        else:
            write_plugin(plugin_dir, name, "#!/bin/bash\necho ran\n")
    args = ["--role", role, "--worker-id", worker_id, "--worker-count", "2",
            "--plugin-location", str(plugin_dir)]
    listed = cli("list", "--json", *args)
    assert listed.returncode == 0, listed.stderr
    selected = {e["name"] for e in json.loads(listed.stdout) if e["selected"]}
    ran = cli("run", *args)
    assert ran.returncode == 0, ran.stderr
    assert set(stdout_lines(ran)) == selected
    if role == "worker":
        assert selected == {n for n, runs in SELECTION.items() if runs}
    else:
        assert selected == {"all_a.sh", "scheduler_e.sh", "sub/deeper/all_g.py"}


def test_run_with_stdout_closed_is_one_error_line(plugin_dir: Path) -> None:
    """`plugin-launcher run >&-`: a usage error naming the problem, no traceback, no plugin."""
    write_plugin(plugin_dir, "worker_a.sh", "#!/bin/sh\necho hi\n")
    result = subprocess.run(["/bin/sh", "-c", 'exec "$@" >&-', "sh", *CLI, "run", "--role",
                             "worker", "--plugin-location", str(plugin_dir)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: stdout is closed: plugin lines would have nowhere to go (redirect it to "
        "/dev/null to discard them)"]
