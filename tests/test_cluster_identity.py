"""Cluster identity: ``--worker-id auto`` / ``--worker-count auto`` on real distributed launchers
(Open MPI's mpirun, torchrun), and the CLI's precedence and errors with hand-set variables.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from helpers import CLI, PYTHON, alive, write_plugin

IDENTITY_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
    "SLURM_PROCID", "SLURM_NTASKS",
    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
    "PMI_RANK", "PMI_SIZE",
    "JOB_COMPLETION_INDEX",
)
WORKERS = 4


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any identity variable (the suite itself may run
    under Slurm or MPI), plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in IDENTITY_VARS and not k.startswith(("OMPI_", "PMIX_", "SLURM_"))}
    env.update(extra)
    return env


# ------------------------------------------------------------------------------ real engines
def recording_plugins(plugin_dir: Path) -> None:
    """Each plugin records its name, PID, the identity the launcher gave it and the rank the
    engine gave the launcher; it leaves a background child behind, which must be gone too."""
    for name in ("worker_2_x.sh", "all_x.sh", "scheduler_x.sh", "worker_7_x.sh"):
        write_plugin(plugin_dir, name, (
            "#!/bin/sh\n"
            "sleep 30 >/dev/null 2>&1 &\n"
            f'echo "{name} $$ $! $LMCACHE_PLUGIN_WORKER_ID $LMCACHE_PLUGIN_WORKER_COUNT '
            '${ENGINE_RANK:-?}" >> "$IDENTITY_OUT"\n'
            "exit 0\n"
        ))


def check_records(out: Path) -> None:
    records = [line.split() for line in out.read_text().splitlines()]
    runs = Counter((name, int(wid), int(count)) for name, _, _, wid, count, _ in records)
    expected = Counter({("all_x.sh", i, WORKERS): 1 for i in range(WORKERS)})
    expected[("worker_2_x.sh", 2, WORKERS)] = 1
    assert runs == expected, records
    for name, _, _, worker_id, _, rank in records:
        assert rank == worker_id, f"{name}: the launcher's worker ID is the engine's rank"
    pids = [int(p) for _, pid, child, *_ in records for p in (pid, child)]
    assert not [p for p in pids if alive(p)], "every plugin process is gone when the engine returns"


def launcher_args(plugin_dir: Path) -> list[str]:
    return ["-m", "plugin_launcher", "run", "--role", "worker", "--worker-id", "auto",
            "--worker-count", "auto", "--plugin-location", str(plugin_dir), "--stop-timeout", "1"]


def run_under_engine(engine: list[str], rank_variable: str, plugin_dir: Path,
                     tmp_path: Path) -> None:
    """Run WORKERS launchers under a real engine and check each rank ran exactly its plugins."""
    recording_plugins(plugin_dir)
    out = tmp_path / "records"
    # the plugins see the launcher's environment; ENGINE_RANK names the engine's own variable
    wrapper = tmp_path / "rank.sh"
    wrapper.write_text(f'#!/bin/sh\nENGINE_RANK=${rank_variable} exec "$@"\n')
    wrapper.chmod(0o755)
    result = subprocess.run(
        [*engine, str(wrapper), PYTHON, *launcher_args(plugin_dir)],
        capture_output=True, text=True, timeout=120, env=clean_env(IDENTITY_OUT=str(out)),
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    check_records(out)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("started plugin") == WORKERS + 1


@pytest.mark.skipif(shutil.which("mpirun") is None,
                    reason="mpirun not installed (Debian: apt-get install openmpi-bin)")
def test_open_mpi_ranks_run_their_own_plugins(plugin_dir: Path, tmp_path: Path) -> None:
    engine = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(WORKERS)]
    run_under_engine(engine, "OMPI_COMM_WORLD_RANK", plugin_dir, tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="torch is not installed (too large for CI); torchrun test skipped")
def test_torchrun_ranks_run_their_own_plugins(plugin_dir: Path, tmp_path: Path) -> None:
    engine = [PYTHON, "-m", "torch.distributed.run", "--standalone",
              f"--nproc_per_node={WORKERS}", "--no-python"]
    run_under_engine(engine, "RANK", plugin_dir, tmp_path)


# ------------------------------------------------------------------------ hand-set variables
FULL = {
    "RANK": "1", "WORLD_SIZE": "11",
    "SLURM_PROCID": "2", "SLURM_NTASKS": "12",
    "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "13",
    "PMI_RANK": "4", "PMI_SIZE": "14",
    "JOB_COMPLETION_INDEX": "5",
}
ORDER = [("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"),
         ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE")]


def cli_list(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "list", "--role", "worker", *args], capture_output=True,
                          text=True, timeout=30, env=clean_env(**env), stdin=subprocess.DEVNULL,
                          cwd=tmp_path)


def identity_line(result: subprocess.CompletedProcess[str]) -> tuple[int, int]:
    match = re.search(r"worker (\d+) of (\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return int(match.group(1)), int(match.group(2))


@pytest.mark.parametrize("dropped", range(len(ORDER)),
                         ids=["torchrun", "slurm", "openmpi", "pmi"])
def test_precedence_torchrun_slurm_openmpi_pmi(
    plugin_dir: Path, tmp_path: Path, dropped: int,
) -> None:
    # the sources before ORDER[dropped] are removed: ORDER[dropped] must win over all later ones
    env = {k: v for k, v in FULL.items() if k not in {v for pair in ORDER[:dropped] for v in pair}}
    result = cli_list(tmp_path, env, "--plugin-location", str(plugin_dir),
                      "--worker-id", "auto", "--worker-count", "auto")
    assert result.returncode == 1, result.stderr  # list: 1, nothing would run (empty folder)
    rank_var, size_var = ORDER[dropped]
    assert identity_line(result) == (int(FULL[rank_var]), int(FULL[size_var]))


def test_plugins_see_the_detected_identity(plugin_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "seen"
    write_plugin(plugin_dir, "worker_x.sh", "#!/bin/sh\n"
                 f'echo "$LMCACHE_PLUGIN_WORKER_ID $LMCACHE_PLUGIN_WORKER_COUNT" > {out}\n')
    write_plugin(plugin_dir, "worker_3_x.sh", f"#!/bin/sh\necho ran > {out}.3\n")
    write_plugin(plugin_dir, "worker_2_x.sh", f"#!/bin/sh\necho ran > {out}.2\n")
    result = subprocess.run(
        [*CLI, "run", "--role", "worker", "--worker-id", "auto", "--worker-count", "auto",
         "--plugin-location", str(plugin_dir), "--stop-timeout", "1"],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        env=clean_env(SLURM_PROCID="3", SLURM_NTASKS="8"),
    )
    assert result.returncode == 0, result.stderr
    assert out.read_text().split() == ["3", "8"]
    assert Path(f"{out}.3").exists() and not Path(f"{out}.2").exists()


def test_job_completion_index_gives_the_id_and_the_count_comes_from_the_flag(
    plugin_dir: Path, tmp_path: Path,
) -> None:
    result = cli_list(tmp_path, {"JOB_COMPLETION_INDEX": "5"}, "--plugin-location",
                      str(plugin_dir), "--worker-id", "auto", "--worker-count", "8")
    assert result.returncode == 1, result.stderr  # list: 1, nothing would run (empty folder)
    assert identity_line(result) == (5, 8)


def test_worker_count_auto_with_only_job_completion_index_asks_for_a_number(
    plugin_dir: Path, tmp_path: Path,
) -> None:
    result = cli_list(tmp_path, {"JOB_COMPLETION_INDEX": "5"}, "--plugin-location",
                      str(plugin_dir), "--worker-id", "auto", "--worker-count", "auto")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ")
    assert "JOB_COMPLETION_INDEX" in line and "--worker-count N" in line


@pytest.mark.parametrize("flags", [("--worker-id", "auto"), ("--worker-count", "auto")])
def test_nothing_found_exits_2_naming_the_variables_tried(
    plugin_dir: Path, tmp_path: Path, flags: tuple[str, str],
) -> None:
    result = cli_list(tmp_path, {}, "--plugin-location", str(plugin_dir), *flags)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ")
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "JOB_COMPLETION_INDEX"):
        assert var in line, line
    assert not result.stdout


def test_run_with_no_identity_starts_no_plugin(plugin_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    write_plugin(plugin_dir, "all_x.sh", f"#!/bin/sh\necho $$ > {marker}\n")
    result = subprocess.run(
        [*CLI, "run", "--role", "worker", "--worker-id", "auto", "--plugin-location",
         str(plugin_dir)], capture_output=True, text=True, timeout=30,
        stdin=subprocess.DEVNULL, env=clean_env())
    assert result.returncode == 2
    assert "error: " in result.stderr and "RANK" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize(
    ("env", "variable"),
    [({"RANK": "abc", "WORLD_SIZE": "4"}, "RANK"),
     ({"SLURM_PROCID": "5", "SLURM_NTASKS": "4"}, "SLURM_PROCID")],
    ids=["not-a-number", "rank-not-below-size"],
)
def test_malformed_identity_exits_2_naming_the_variable(
    plugin_dir: Path, tmp_path: Path, env: dict[str, str], variable: str,
) -> None:
    result = cli_list(tmp_path, env, "--plugin-location", str(plugin_dir),
                      "--worker-id", "auto", "--worker-count", "auto")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and variable in result.stderr


def test_explicit_numbers_win_over_the_environment(plugin_dir: Path, tmp_path: Path) -> None:
    result = cli_list(tmp_path, FULL, "--plugin-location", str(plugin_dir),
                      "--worker-id", "6", "--worker-count", "9")
    assert result.returncode == 1, result.stderr  # list: 1, nothing would run (empty folder)
    assert identity_line(result) == (6, 9)
    # and auto for one of them only takes that one from the environment
    result = cli_list(tmp_path, FULL, "--plugin-location", str(plugin_dir),
                      "--worker-id", "auto", "--worker-count", "20")
    assert identity_line(result) == (1, 20)
