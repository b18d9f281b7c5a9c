"""Log formats (``--log-format json``, ``--timestamps``), per-plugin rotated log files, the tail
buffer, and sinks written before ``write`` took a PID."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import CLI, ProcessTracker, start, wait_for, wait_running, write_plugin

from plugin_launcher import ConfigError, PluginLauncher, load_config
from plugin_launcher.logs import JsonSink, RingBuffer, RotatingLog

ENV = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
MIXED = """\
import os, sys
print("out one", flush=True)
sys.stderr.write("err one\\n"); sys.stderr.flush()
sys.stdout.buffer.write(b"bad \\xff byte \\"quoted\\"\\n"); sys.stdout.flush()
"""
FLOOD = """\
import sys
out = sys.stdout
for i in range({n}):
    out.write(f"{{i:06d}} line of the flood\\n")
"""


def run_cli(folder: Path, *args: str, config: Path | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    extra = ["--config", str(config)] if config is not None else []
    return subprocess.run([*CLI, "run", "--role", "worker", "--plugin-location", str(folder),
                           *extra, *args], capture_output=True, timeout=timeout, env=ENV,
                          stdin=subprocess.DEVNULL)


def write_config(path: Path, options: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"plugin_options": options}))  # JSON is YAML
    return path


# ------------------------------------------------------------------------------- log formats
def test_json_format_one_object_per_line_with_pid_and_stream(plugin_dir: Path) -> None:
    write_plugin(plugin_dir, "all_mixed.py", MIXED, 0o644)
    result = run_cli(plugin_dir, "--log-format", "json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(raw) for raw in result.stdout.decode().splitlines()]
    own = [json.loads(raw) for raw in result.stderr.decode().splitlines()]
    started = [e for e in own if e["message"].startswith("started plugin all_mixed.py")]
    assert len(started) == 1 and started[0]["level"] == "INFO"
    assert all(re.fullmatch(STAMP, e["time"]) for e in own)
    pid = int(re.search(r"\(pid (\d+)\)", started[0]["message"]).group(1))  # type: ignore[union-attr]
    by_stream = {(e["stream"], e["line"]) for e in lines}
    assert by_stream == {("stdout", "out one"), ("stderr", "err one"),
                         ("stdout", 'bad \ufffd byte "quoted"')}
    for entry in lines:
        assert set(entry) == {"time", "plugin", "stream", "pid", "line"}
        assert entry["plugin"] == "all_mixed.py" and entry["pid"] == pid
        assert re.fullmatch(STAMP, entry["time"])


def test_text_timestamps_before_the_name(plugin_dir: Path) -> None:
    write_plugin(plugin_dir, "all_mixed.py", MIXED, 0o644)
    plain = run_cli(plugin_dir)
    assert plain.stdout.decode().splitlines()[0] == "[all_mixed.py] out one", "default unchanged"
    result = run_cli(plugin_dir, "--timestamps")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode("utf-8", "replace").splitlines()
    assert len(lines) == 3
    for line in lines:
        assert re.fullmatch(STAMP + r" \[all_mixed\.py\] .+", line), line


def test_json_sink_splits_blocks_and_escapes(tmp_path: Path) -> None:
    path = tmp_path / "out"
    with open(path, "wb") as f:
        JsonSink(f.fileno()).write("a\udcffb.py", "stderr", b"x\ny\t\"z\"\n\xfe\n", pid=42)
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["line"] for e in entries] == ["x", 'y\t"z"', "\ufffd"]
    assert {(e["plugin"], e["stream"], e["pid"]) for e in entries} == {("a\ufffdb.py", "stderr",
                                                                        42)}


def test_a_three_argument_sink_still_works(plugin_dir: Path, tracker: ProcessTracker,
                                           launchers: list[PluginLauncher]) -> None:
    class OldSink:  # written before write() took a PID
        def __init__(self) -> None:
            self.lines: list[bytes] = []

        def write(self, name: str, stream: str, block: bytes) -> None:
            self.lines.extend(block.splitlines())

    write_plugin(plugin_dir, "all_mixed.py", MIXED, 0o644)
    sink = OldSink()
    launcher = PluginLauncher({"plugin_locations": [str(plugin_dir)]}, "worker", sink=sink)
    start(launcher, launchers)
    assert launcher.wait(10)
    assert sorted(sink.lines) == sorted([b"out one", b"err one", b'bad \xff byte "quoted"'])


# ------------------------------------------------------------------------- per-plugin files
def read_numbers(files: list[Path]) -> list[int]:
    numbers = []
    for path in files:
        data = path.read_bytes()
        assert not data or data.endswith(b"\n"), f"{path.name} ends inside a line"
        for line in data.splitlines():
            assert re.fullmatch(rb"\d{6} line of the flood", line), (path.name, line)
            numbers.append(int(line[:6]))
    return numbers


def rotated(base: Path) -> list[Path]:
    """base.N ... base.1, base: oldest first."""
    backups = sorted((p for p in base.parent.glob(base.name + ".*")),
                     key=lambda p: int(p.suffix[1:]), reverse=True)
    return [*backups, base]


def test_rotation_under_a_flood_loses_no_line(plugin_dir: Path, tmp_path: Path) -> None:
    n = 200_000
    write_plugin(plugin_dir, "all_flood.py", FLOOD.format(n=n), 0o644)
    logs = tmp_path / "logs"
    config = write_config(tmp_path / "c.yaml", {"all_flood.py": {
        "log_file": str(logs / "{role}-{worker_id}-{name}.log"),
        "log_max_bytes": "64K", "log_backups": 1000}})
    result = run_cli(plugin_dir, config=config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(b"\n") == n, "the main output still gets every line"
    base = logs / "worker-0-all_flood.py.log"
    files = rotated(base)
    assert len(files) > 20, "rotated many times"
    assert all(f.stat().st_size <= 64 * 1024 for f in files)
    assert read_numbers(files) == list(range(n)), "every line once, in order, never split"


def test_few_backups_keep_the_newest_lines_whole(plugin_dir: Path, tmp_path: Path) -> None:
    n = 50_000
    write_plugin(plugin_dir, "all_flood.py", FLOOD.format(n=n), 0o644)
    base = tmp_path / "flood.log"
    config = write_config(tmp_path / "c.yaml", {"default": {
        "log_file": str(base), "log_max_bytes": 10_000, "log_backups": 2}})
    assert run_cli(plugin_dir, config=config).returncode == 0
    files = rotated(base)
    assert [f.name for f in files] == ["flood.log.2", "flood.log.1", "flood.log"]
    numbers = read_numbers(files)
    assert numbers[-1] == n - 1
    assert numbers == list(range(numbers[0], n)), "the newest lines, contiguous"


def test_log_file_that_cannot_be_opened_is_one_error_and_the_plugin_runs_on(
        plugin_dir: Path, tmp_path: Path) -> None:
    write_plugin(plugin_dir, "all_flood.py", FLOOD.format(n=1000), 0o644)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    config = write_config(tmp_path / "c.yaml", {"default": {
        "log_file": str(blocker / "x.log")}})
    result = run_cli(plugin_dir, config=config)
    assert result.returncode == 0
    assert result.stdout.count(b"\n") == 1000
    errors = [line for line in result.stderr.decode().splitlines() if "log file" in line]
    assert len(errors) == 1 and "cannot open it" in errors[0], result.stderr


def test_rotating_log_single_line_larger_than_the_file(tmp_path: Path) -> None:
    log = RotatingLog(str(tmp_path / "x.log"), max_bytes=10, backups=3)
    log.write(b"abc\n" + b"x" * 30 + b"\n" + b"de\n")
    log.close()
    assert (tmp_path / "x.log.2").read_bytes() == b"abc\n"
    assert (tmp_path / "x.log.1").read_bytes() == b"x" * 30 + b"\n"
    assert (tmp_path / "x.log").read_bytes() == b"de\n"


@pytest.mark.parametrize(("options", "message"), [
    ({"log_file": "/x/{plugin}.log"}, r"plugin_options.default.log_file: unknown field \{plugin\}"),
    ({"log_file": "/x/{name"}, r"plugin_options.default.log_file: .*brace"),
    ({"log_file": ""}, r"plugin_options.default.log_file: expected a file path"),
    ({"log_max_bytes": "lots"}, r"plugin_options.default.log_max_bytes: expected a size"),
    ({"log_backups": -1}, r"plugin_options.default.log_backups: must be between 0 and 1000"),
    ({"log_backups": "5"}, r"plugin_options.default.log_backups: expected an integer"),
])
def test_log_options_are_checked(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    config = write_config(tmp_path / "c.yaml", {"default": options})
    with pytest.raises(ConfigError, match=message):
        load_config(str(config))


def test_log_options_parse(tmp_path: Path) -> None:
    config = load_config(str(write_config(tmp_path / "c.yaml", {"default": {
        "log_file": "/var/log/{role}/{name}.log", "log_max_bytes": "1M", "log_backups": 0},
        "x.py": {"log_max_bytes": 0}})))
    default = config.options.for_plugin("y.py")
    assert (default.log_file, default.log_max_bytes, default.log_backups) == (
        "/var/log/{role}/{name}.log", 1 << 20, 0)
    assert config.options.for_plugin("x.py").log_max_bytes == 0


# ---------------------------------------------------------------------------------- tail ring
def test_ring_buffer_is_bounded_by_lines_and_bytes() -> None:
    ring = RingBuffer(max_lines=1000, max_size=256 * 1024)
    for i in range(5000):
        ring.add(b"".join(b"%06d\n" % (i * 10 + j) for j in range(10)), 10)
    assert ring.lines <= 1010 and ring.size <= 256 * 1024 + 70
    assert ring.last(3) == [b"049997", b"049998", b"049999"]
    assert len(ring.last(5000)) == 1000
    wide = RingBuffer(max_lines=1000, max_size=256 * 1024)
    for _ in range(100):
        wide.add(b"y" * 9999 + b"\n", 1)
    assert len(wide.last(1000)) == 26 and wide.size <= 256 * 1024 + 10_000


def test_tail_through_the_api(plugin_dir: Path, tracker: ProcessTracker,
                              launchers: list[PluginLauncher]) -> None:
    write_plugin(plugin_dir, "all_flood.py",
                 FLOOD.format(n=3000) + "import time\ntime.sleep(1000)\n", 0o644)
    launcher = PluginLauncher({"plugin_locations": [str(plugin_dir)]}, "worker")
    start(launcher, launchers)
    wait_running(launcher, "all_flood.py", tracker)
    wait_for(lambda: launcher.tail("all_flood.py", 1) == ["002999 line of the flood"])
    lines = launcher.tail("all_flood.py", 5000)
    assert len(lines) == 1000 and lines[0] == "002000 line of the flood"
    assert launcher.tail("all_flood.py", 0) == []
