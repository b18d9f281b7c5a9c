"""Smoke test of benchmarks/run.py: every scenario runs at tiny size, checks pass, rows print.

The benchmarks themselves are not run by pytest (they take minutes and assert no timings); this
only keeps the script from rotting: it must exit 0 (its correctness checks passed: no line lost,
no process left), print one table row per figure, and leave no process of its own behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers import PYTHON, alive, wait_for

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "run.py"

ROWS = {
    1: ["1a", "1b"],
    2: ["2"],
    3: ["3", "3t", "3p", "3f"],
    4: ["4"],
    5: ["5a", "5at", "5am", "5b", "5bt", "5bm"],
    6: ["61kl", "61kb", "61kn"],  # host tax at 1,000 lines/s, 2 plugins
}


def processes_with(token: bytes) -> list[int]:
    """Live processes whose environment carries ``token`` (the benchmark and all it started)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if token in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return [pid for pid in found if alive(pid)]


def run_benchmark(*args: str) -> subprocess.CompletedProcess[str]:
    token = f"PLBENCH_SMOKE={uuid.uuid4().hex}"
    env = dict(os.environ)
    key, value = token.split("=")
    env[key] = value
    try:
        result = subprocess.run([PYTHON, str(SCRIPT), "--size", "small", "--repeat", "1", *args],
                                capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    finally:
        try:
            wait_for(lambda: not processes_with(token.encode()), 5,
                     message="every process the benchmark started to be gone")
        finally:
            for pid in processes_with(token.encode()):
                os.kill(pid, signal.SIGKILL)
    return result


@pytest.mark.parametrize("scenario", sorted(ROWS))
def test_scenario_runs_and_prints_its_rows(scenario: int) -> None:
    result = run_benchmark("--scenario", str(scenario))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CHECK FAILED" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("machine: ") and "cores" in line for line in lines)
    printed = {line.split()[0]: line for line in lines if line.strip()}
    for row in ROWS[scenario]:
        assert row in printed, f"row {row} missing from:\n{result.stdout}"
        columns = re.split(r"\s{2,}", printed[row])  # #, scenario, launcher, baseline, ...
        assert len(columns) == 7 and columns[2] != "-", f"no figure in row {printed[row]!r}"
        assert columns[6] in ("yes", "NO", "-")
    other = {r for s, rows in ROWS.items() if s != scenario for r in rows}
    assert not other & set(printed), "only the requested scenario runs"


def test_json_output() -> None:
    result = run_benchmark("--scenario", "2", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["failures"] == []
    assert data["machine"]["cores"] == os.cpu_count()
    (row,) = data["rows"]
    assert row["id"] == "2" and len(row["samples"]) == 1 and len(row["baseline"]) == 1
    assert row["median"] > 0 and row["baseline_median"] > 0 and row["goal_met"] in (True, False)


def test_bad_option_is_refused() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--scenario", "9"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--scenario" in result.stderr
