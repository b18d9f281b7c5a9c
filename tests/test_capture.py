"""Output capture: every line a plugin prints arrives, in order, prefixed with its name.

Through the API each line is one record on the ``plugin_launcher`` logger (with ``plugin`` and
``stream`` attributes); through the CLI each line is ``[name] text`` on stdout.  Real plugins print
100,000 lines, invalid UTF-8, a last line without newline, a 200 KiB line, and flood both streams.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import CLI, wait_for, write_plugin

from plugin_launcher import PluginLauncher

LIMIT = 64 * 1024
MANY = 100_000

HUNDRED_THOUSAND = "#!/bin/bash\nseq 1 100000\n"

BOTH_STREAMS = """\
import sys
for i in range(5):
    print(f"out {i}")
    print(f"err {i}", file=sys.stderr)
"""

# Invalid UTF-8, then a character split across two writes, then it keeps running and printing.
INVALID_UTF8 = """\
import sys, time
out = sys.stdout.buffer
out.write(b"bad \\xff\\xfe bytes\\n"); out.flush()
out.write(b"split \\xe2\\x82"); out.flush()
time.sleep(0.1)
out.write(b"\\xac euro\\n"); out.flush()
for i in range({ticks}):
    print(f"tick {{i}}", flush=True)
    time.sleep(0.05)
"""

NO_FINAL_NEWLINE = "#!/bin/bash\nprintf 'first\\nlast without newline'\nprintf 'err tail' >&2\n"

LONG_LINE = """\
import sys
line = b"0123456789abcdef" * (200 * 1024 // 16)
sys.stdout.buffer.write(line + b"\\n")
sys.stdout.buffer.write(b"after\\n")
"""

# Writes both pipes as fast as it can, in alternating 100-line blocks: a launcher that drains one
# pipe at a time blocks it forever; one that drops data shows gaps.
FLOOD = """\
import os
N, PAD = {n}, "x" * 150
for start in range(0, N, 100):
    for fd, tag in ((1, "out"), (2, "err")):
        block = "".join(f"{{tag}} {{i}} {{PAD}}\\n" for i in range(start, start + 100))
        data = block.encode()
        while data:
            data = data[os.write(fd, data):]
"""

EXITS = {
    "worker_ok.sh": "#!/bin/bash\necho fine\nexit 0\n",
    "worker_fail.sh": "#!/bin/bash\necho failing\nexit 3\n",
    "worker_killed.py": "import os, signal\nprint('dying', flush=True)\n"
                        "os.kill(os.getpid(), signal.SIGKILL)\n",
}


def flood_expected(n: int, tag: str) -> list[str]:
    pad = "x" * 150
    return [f"{tag} {i} {pad}" for i in range(n)]


def long_line() -> str:
    return "0123456789abcdef" * (200 * 1024 // 16)


# ------------------------------------------------------------------------------------- API side
@pytest.fixture
def run_plugins(plugin_dir: Path, caplog: pytest.LogCaptureFixture,
                launchers: list[PluginLauncher]) -> Callable[..., PluginLauncher]:
    """Write the given plugins, launch them, return the launcher (stopped at teardown)."""
    caplog.set_level(logging.INFO, logger="plugin_launcher")

    def run(plugins: dict[str, str]) -> PluginLauncher:
        for name, text in plugins.items():
            write_plugin(plugin_dir, name, text)
        config = {"plugin_locations": [str(plugin_dir)],
                  "plugin_options": {"default": {"stop_timeout": 1}}}
        launcher = PluginLauncher(config, role="worker")
        launchers.append(launcher)
        launcher.launch_plugins()
        return launcher

    return run


def records(caplog: pytest.LogCaptureFixture, name: str,
            stream: str | None = None) -> list[logging.LogRecord]:
    return [r for r in list(caplog.records) if r.name == "plugin_launcher"
            and getattr(r, "plugin", None) == name
            and (stream is None or getattr(r, "stream", None) == stream)]


def lines(caplog: pytest.LogCaptureFixture, name: str, stream: str | None = None) -> list[str]:
    """What plugin ``name`` printed, as logged, without the ``[name] `` prefix."""
    prefix = f"[{name}] "
    out = []
    for record in records(caplog, name, stream):
        message = record.getMessage()
        assert message.startswith(prefix), message
        out.append(message[len(prefix):])
    return out


def finished(launcher: PluginLauncher, timeout: float = 30) -> None:
    assert launcher.wait(timeout=timeout), "the plugins did not finish"


def test_100000_lines_are_logged_exactly_and_in_order(
        run_plugins: Callable[..., PluginLauncher], caplog: pytest.LogCaptureFixture) -> None:
    launcher = run_plugins({"worker_many.sh": HUNDRED_THOUSAND})
    finished(launcher)
    got = lines(caplog, "worker_many.sh", "stdout")
    assert len(got) == MANY
    assert got == [str(i) for i in range(1, MANY + 1)]
    assert launcher.status()[0]["output_lines"] == MANY


def test_stdout_and_stderr_are_both_captured_with_name_and_stream(
        run_plugins: Callable[..., PluginLauncher], caplog: pytest.LogCaptureFixture) -> None:
    finished(run_plugins({"worker_both.py": BOTH_STREAMS}))
    assert lines(caplog, "worker_both.py", "stdout") == [f"out {i}" for i in range(5)]
    assert lines(caplog, "worker_both.py", "stderr") == [f"err {i}" for i in range(5)]
    for record in records(caplog, "worker_both.py"):
        assert record.levelno == logging.INFO
        assert record.getMessage().startswith("[worker_both.py] ")


def test_invalid_utf8_is_replaced_and_the_plugin_keeps_running(
        run_plugins: Callable[..., PluginLauncher], caplog: pytest.LogCaptureFixture) -> None:
    launcher = run_plugins({"worker_bad.py": INVALID_UTF8.format(ticks=10_000)})
    wait_for(lambda: "tick 3" in lines(caplog, "worker_bad.py"), 15,
             message="lines printed after the invalid bytes")
    got = lines(caplog, "worker_bad.py")
    assert got[:3] == ["bad \ufffd\ufffd bytes", "split \u20ac euro", "tick 0"]
    assert got[3:5] == ["tick 1", "tick 2"]
    assert launcher.plugins[0].running, "invalid output must not end the plugin"


def test_a_last_line_without_newline_is_logged(
        run_plugins: Callable[..., PluginLauncher], caplog: pytest.LogCaptureFixture) -> None:
    finished(run_plugins({"worker_tail.sh": NO_FINAL_NEWLINE}))
    assert lines(caplog, "worker_tail.sh", "stdout") == ["first", "last without newline"]
    assert lines(caplog, "worker_tail.sh", "stderr") == ["err tail"]


def test_a_200_kib_line_is_logged_in_64_kib_pieces(
        run_plugins: Callable[..., PluginLauncher], caplog: pytest.LogCaptureFixture) -> None:
    finished(run_plugins({"worker_long.py": LONG_LINE}))
    got = lines(caplog, "worker_long.py")
    assert got[-1] == "after"
    pieces = got[:-1]
    assert [len(p) for p in pieces] == [LIMIT, LIMIT, LIMIT, 200 * 1024 - 3 * LIMIT]
    assert "".join(pieces) == long_line(), "bytes lost or reordered between the pieces"


def test_a_plugin_flooding_stdout_and_stderr_loses_nothing(
        run_plugins: Callable[..., PluginLauncher], caplog: pytest.LogCaptureFixture) -> None:
    n = 20_000
    finished(run_plugins({"worker_flood.py": FLOOD.format(n=n)}))
    assert lines(caplog, "worker_flood.py", "stdout") == flood_expected(n, "out")
    assert lines(caplog, "worker_flood.py", "stderr") == flood_expected(n, "err")


def exit_records(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in list(caplog.records) if r.name.startswith("plugin_launcher.")
            and f"plugin {name} " in r.getMessage()
            and ("exited with" in r.getMessage() or "killed by" in r.getMessage())]


def test_the_exit_code_or_signal_is_logged(
        run_plugins: Callable[..., PluginLauncher], caplog: pytest.LogCaptureFixture) -> None:
    finished(run_plugins(EXITS))
    [ok] = exit_records(caplog, "worker_ok.sh")
    assert ok.levelno == logging.INFO and "exited with code 0" in ok.getMessage()
    [fail] = exit_records(caplog, "worker_fail.sh")
    assert fail.levelno == logging.WARNING and "exited with code 3" in fail.getMessage()
    [killed] = exit_records(caplog, "worker_killed.py")
    assert killed.levelno == logging.WARNING and "SIGKILL" in killed.getMessage()
    assert lines(caplog, "worker_fail.sh") == ["failing"]
    assert lines(caplog, "worker_killed.py") == ["dying"]


def test_a_plugin_that_cannot_start_is_logged_and_the_others_still_run(
        run_plugins: Callable[..., PluginLauncher], caplog: pytest.LogCaptureFixture,
        tmp_path: Path) -> None:
    fake = tmp_path / "fake-interpreter"
    fake.write_text("not a program\n")
    fake.chmod(0o755)
    launcher = run_plugins({"worker_broken.sh": f"#!{fake}\necho never\n",
                            "worker_good.sh": "#!/bin/bash\necho good\n"})
    finished(launcher)
    assert lines(caplog, "worker_good.sh") == ["good"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r for r in errors if "worker_broken.sh" in r.getMessage()], "the failure is logged"
    status = {s["name"]: s for s in launcher.status()}
    assert status["worker_broken.sh"]["error"]
    assert status["worker_good.sh"]["exit_code"] == 0


# ------------------------------------------------------------------------------------- CLI side
def run_cli(plugin_dir: Path, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    return subprocess.run(
        [*CLI, "run", "--role", "worker", "--plugin-location", str(plugin_dir),
         "--stop-timeout", "1"],
        capture_output=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL,
    )


def by_plugin(stdout: bytes) -> dict[str, list[str]]:
    """Split the CLI's stdout into each plugin's lines (``[name] text``)."""
    result: dict[str, list[str]] = {}
    for raw in stdout.decode("utf-8").split("\n")[:-1]:
        assert raw.startswith("["), f"unprefixed line on stdout: {raw[:80]!r}"
        name, text = raw[1:].split("] ", 1)
        result.setdefault(name, []).append(text)
    return result


def test_cli_prints_every_line_of_every_plugin(plugin_dir: Path, tracker: Any) -> None:
    n = 20_000
    for name, text in {
        "worker_many.sh": HUNDRED_THOUSAND,
        "worker_both.py": BOTH_STREAMS,
        "worker_bad.py": INVALID_UTF8.format(ticks=3),
        "worker_tail.sh": NO_FINAL_NEWLINE,
        "worker_long.py": LONG_LINE,
        "worker_flood.py": FLOOD.format(n=n),
    }.items():
        write_plugin(plugin_dir, name, text)
    result = run_cli(plugin_dir)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.endswith(b"\n")
    out = by_plugin(result.stdout)
    assert out["worker_many.sh"] == [str(i) for i in range(1, MANY + 1)]
    assert sorted(out["worker_both.py"]) == sorted([f"out {i}" for i in range(5)]
                                                   + [f"err {i}" for i in range(5)])
    assert [x for x in out["worker_both.py"] if x.startswith("out")] == \
        [f"out {i}" for i in range(5)]
    assert out["worker_bad.py"] == ["bad \ufffd\ufffd bytes", "split \u20ac euro",
                                    "tick 0", "tick 1", "tick 2"]
    assert sorted(out["worker_tail.sh"]) == ["err tail", "first", "last without newline"]
    assert out["worker_long.py"][-1] == "after"
    pieces = out["worker_long.py"][:-1]
    assert [len(p) for p in pieces] == [LIMIT, LIMIT, LIMIT, 200 * 1024 - 3 * LIMIT]
    assert "".join(pieces) == long_line()
    flood = out["worker_flood.py"]
    assert [x for x in flood if x.startswith("out")] == flood_expected(n, "out")
    assert [x for x in flood if x.startswith("err")] == flood_expected(n, "err")
    assert len(flood) == 2 * n


def test_cli_logs_exit_codes_and_signals_on_stderr(plugin_dir: Path, tracker: Any) -> None:
    for name, text in EXITS.items():
        write_plugin(plugin_dir, name, text)
    result = run_cli(plugin_dir, timeout=30)
    assert result.returncode == 1, "a plugin failed, so run exits 1"
    out = by_plugin(result.stdout)
    assert out == {"worker_ok.sh": ["fine"], "worker_fail.sh": ["failing"],
                   "worker_killed.py": ["dying"]}
    log = result.stderr.decode().splitlines()

    def line_about(name: str) -> str:
        [line] = [x for x in log
                  if f"plugin {name} " in x and ("exited with" in x or "killed by" in x)]
        return line

    assert " INFO " in line_about("worker_ok.sh")
    assert "exited with code 0" in line_about("worker_ok.sh")
    assert " WARNING " in line_about("worker_fail.sh")
    assert "exited with code 3" in line_about("worker_fail.sh")
    assert " WARNING " in line_about("worker_killed.py")
    assert "SIGKILL" in line_about("worker_killed.py")
