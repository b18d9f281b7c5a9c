"""Tests of plugin_launcher.plugin, the plugin authors' kit: context, options, every(), stopping."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import plugin_launcher.plugin as kit
from plugin_launcher.plugin import PluginContext, PluginEnvironmentError

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 10.0  # seconds; generous for a loaded 2-core machine, never waited out when all is well


def env(**overrides: str | None) -> dict[str, str]:
    """A complete, valid plugin environment with some variables changed (None removes one)."""
    base = {
        "LMCACHE_PLUGIN_ROLE": "WORKER",
        "LMCACHE_PLUGIN_WORKER_ID": "1",
        "LMCACHE_PLUGIN_WORKER_COUNT": "2",
        "LMCACHE_PLUGIN_CONFIG": json.dumps(
            {"plugin_locations": ["/p"], "extra_config": {"port": 9400}, "other": True}
        ),
        "LMCACHE_PLUGIN_PARENT_PID": "4242",
        "LMCACHE_PLUGIN_NAME": "all_test.py",
    }
    for key, value in overrides.items():
        name = f"LMCACHE_PLUGIN_{key}"
        if value is None:
            base.pop(name, None)
        else:
            base[name] = value
    return base


def context(**extra_config: Any) -> PluginContext:
    return PluginContext.from_env(env(CONFIG=json.dumps({"extra_config": extra_config})))


# -- from_env ------------------------------------------------------------------------------------


def test_from_env_reads_every_variable() -> None:
    ctx = PluginContext.from_env(env())
    assert ctx.role == "WORKER"
    assert ctx.worker_id == 1
    assert ctx.worker_count == 2
    assert ctx.config == {"plugin_locations": ["/p"], "extra_config": {"port": 9400}, "other": True}
    assert ctx.extra_config == {"port": 9400}
    assert ctx.name == "all_test.py"
    assert ctx.parent_pid == 4242
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.role = "SCHEDULER"  # type: ignore[misc]


def test_from_env_normalises_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/somewhere/scheduler_x.py"])
    ctx = PluginContext.from_env(
        env(
            ROLE=" scheduler ",
            WORKER_ID="-1",
            PARENT_PID=None,
            NAME=None,
            CONFIG=json.dumps({"plugin_locations": []}),
        )
    )
    assert ctx.role == "SCHEDULER"
    assert ctx.worker_id is None  # -1 means "no worker ID"
    assert ctx.parent_pid is None
    assert ctx.name == "scheduler_x.py"
    assert ctx.extra_config == {}


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in env(WORKER_ID="0").items():
        monkeypatch.setenv(key, value)
    ctx = PluginContext.from_env(handle_signals=False)
    assert (ctx.role, ctx.worker_id, ctx.parent_pid) == ("WORKER", 0, 4242)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ROLE": None}, "LMCACHE_PLUGIN_ROLE: not set"),
        ({"ROLE": "  "}, "LMCACHE_PLUGIN_ROLE: empty"),
        ({"WORKER_ID": None}, "LMCACHE_PLUGIN_WORKER_ID: not set"),
        ({"WORKER_ID": "one"}, "LMCACHE_PLUGIN_WORKER_ID: expected an integer >= -1, got 'one'"),
        ({"WORKER_ID": "-2"}, "LMCACHE_PLUGIN_WORKER_ID: expected an integer >= -1, got '-2'"),
        ({"WORKER_COUNT": "x"}, "LMCACHE_PLUGIN_WORKER_COUNT: expected an integer >= 1, got 'x'"),
        ({"WORKER_COUNT": "0"}, "LMCACHE_PLUGIN_WORKER_COUNT: expected an integer >= 1, got '0'"),
        (
            {"WORKER_COUNT": "1.5"},
            "LMCACHE_PLUGIN_WORKER_COUNT: expected an integer >= 1, got '1.5'",
        ),
        ({"PARENT_PID": "0"}, "LMCACHE_PLUGIN_PARENT_PID: expected an integer >= 1, got '0'"),
        ({"PARENT_PID": "pid"}, "LMCACHE_PLUGIN_PARENT_PID: expected an integer >= 1, got 'pid'"),
        ({"CONFIG": None}, "LMCACHE_PLUGIN_CONFIG: not set"),
        ({"CONFIG": "[1, 2]"}, "LMCACHE_PLUGIN_CONFIG: expected a JSON object, got an array"),
        (
            {"CONFIG": '{"extra_config": [1]}'},
            "LMCACHE_PLUGIN_CONFIG: extra_config must be a JSON object, got an array",
        ),
    ],
)
def test_from_env_names_the_bad_variable(overrides: dict[str, str | None], message: str) -> None:
    with pytest.raises(PluginEnvironmentError) as info:
        PluginContext.from_env(env(**overrides))
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


def test_from_env_bad_json_names_the_variable() -> None:
    with pytest.raises(PluginEnvironmentError, match=r"^LMCACHE_PLUGIN_CONFIG: not valid JSON \("):
        PluginContext.from_env(env(CONFIG="{oops"))


def test_from_env_reports_all_problems_in_one_error() -> None:
    with pytest.raises(PluginEnvironmentError) as info:
        PluginContext.from_env({})
    assert str(info.value) == (
        "LMCACHE_PLUGIN_ROLE: not set; LMCACHE_PLUGIN_WORKER_ID: not set; "
        "LMCACHE_PLUGIN_WORKER_COUNT: not set; LMCACHE_PLUGIN_CONFIG: not set"
    )


# -- option --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind", "kwargs", "expected"),
    [
        (9400, int, {}, 9400),
        (9400, int, {"minimum": 1, "maximum": 65535}, 9400),
        (2, float, {}, 2.0),  # an integer is a fine number
        (0.5, float, {"minimum": 0.1}, 0.5),
        ("http://x", str, {}, "http://x"),
        (False, bool, {}, False),
        ([1, 2], list, {}, [1, 2]),
        ({"a": 1}, dict, {}, {"a": 1}),
    ],
)
def test_option_accepts_valid_values(
    value: Any, kind: type, kwargs: dict[str, Any], expected: Any
) -> None:
    got = context(key=value).option("key", kind, **kwargs)
    assert got == expected
    assert type(got) is type(expected)


def test_option_missing_gives_default_or_none() -> None:
    ctx = context(empty=None)  # a YAML `empty:` with no value
    assert ctx.option("absent", int) is None
    assert ctx.option("absent", float, 10.0) == 10.0
    assert ctx.option("empty", str, "fallback") == "fallback"


@pytest.mark.parametrize(
    ("value", "kind", "kwargs", "message"),
    [
        ("9400", int, {}, "expected an integer, got '9400'"),
        (True, int, {}, "expected an integer, got True"),
        (True, float, {}, "expected a number, got True"),
        ("fast", float, {}, "expected a number, got 'fast'"),
        (5, str, {}, "expected a string, got 5"),
        ("yes", bool, {}, "expected true or false, got 'yes'"),
        (
            70000,
            int,
            {"minimum": 1, "maximum": 65535},
            "expected an integer from 1 to 65535, got 70000",
        ),
        (0, float, {"minimum": 0.01}, "expected a number >= 0.01, got 0.0"),
        (11, int, {"maximum": 10}, "expected an integer <= 10, got 11"),
        ({"a": 1}, list, {}, "expected a list, got {'a': 1}"),
    ],
)
def test_option_rejects_bad_values_naming_the_key(
    value: Any, kind: type, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(PluginEnvironmentError) as info:
        context(key=value).option("key", kind, **kwargs)
    assert str(info.value) == f"LMCACHE_PLUGIN_CONFIG: extra_config.key: {message}"


def test_option_required() -> None:
    ctx = context(url="http://x")
    assert ctx.option("url", str, required=True) == "http://x"
    with pytest.raises(PluginEnvironmentError) as info:
        ctx.option("heartbeat_url", str, required=True)
    assert str(info.value) == (
        "LMCACHE_PLUGIN_CONFIG: extra_config.heartbeat_url is required (a string)"
    )


# -- parent_alive, log ---------------------------------------------------------------------------


def test_parent_alive() -> None:
    assert dataclasses.replace(context(), parent_pid=os.getpid()).parent_alive()
    assert not dataclasses.replace(context(), parent_pid=None).parent_alive()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: the PID is free (and not reused this quickly)
    assert not dataclasses.replace(context(), parent_pid=gone.pid).parent_alive()


def test_log_prints_flushed_lines(capsys: pytest.CaptureFixture[str]) -> None:
    kit.log("to stdout")
    context().log("to stderr", error=True)
    out, err = capsys.readouterr()
    assert (out, err) == ("to stdout\n", "to stderr\n")


# -- every ---------------------------------------------------------------------------------------


def test_every_calls_until_stopped() -> None:
    ctx = context()
    calls: list[float] = []

    def tick() -> None:
        calls.append(time.monotonic())
        if len(calls) == 3:
            ctx.stop()

    ctx.every(0.01, tick)
    assert len(calls) == 3
    assert ctx.stopping.is_set()


def test_every_logs_exceptions_and_goes_on(capsys: pytest.CaptureFixture[str]) -> None:
    ctx = context()
    calls = 0

    def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom 1")
        if calls == 2:
            raise RuntimeError("boom\n2")  # still one line
        if calls == 4:
            raise ConnectionRefusedError("refused")
        if calls == 5:
            ctx.stop()

    ctx.every(0.01, flaky)
    assert calls == 5
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3  # one line per failure, no traceback
    assert lines[0].startswith(
        "all_test.py: flaky failed: RuntimeError: boom 1 (at test_plugin_kit.py:"
    )
    assert lines[0].endswith(" (failure 1 in a row, next call in 0.01 s)")
    assert "boom 2" in lines[1] and "(failure 2 in a row" in lines[1]
    # an OSError says enough by itself; the count restarted after the success
    assert lines[2] == (
        "all_test.py: flaky failed: ConnectionRefusedError: refused "
        "(failure 1 in a row, next call in 0.01 s)"
    )


def test_every_backs_off_while_failing(capsys: pytest.CaptureFixture[str]) -> None:
    ctx = context()
    results = iter([False, False, False, False, True, False])

    def attempt() -> None:
        ok = next(results, None)
        if ok is None:
            ctx.stop()
        elif not ok:
            raise OSError("down")

    ctx.every(0.005, attempt, max_backoff=0.03)
    delays = [line.rsplit("next call in ", 1)[1] for line in capsys.readouterr().err.splitlines()]
    # doubling from the interval, capped at max_backoff, and reset by the success
    assert delays == ["0.01 s)", "0.02 s)", "0.03 s)", "0.03 s)", "0.01 s)"]


def test_every_abandons_a_call_past_its_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    ctx = context()
    release, skipped = threading.Event(), threading.Event()
    calls = 0

    def sometimes_hangs() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            release.wait(DEADLINE)  # hangs until released
        elif calls == 2:
            ctx.stop()

    def spy(message: str, *, error: bool = False) -> None:
        kit.log(message, error=error)
        if "skipped" in message:
            skipped.set()  # the next tick saw the abandoned call still running
            release.set()

    object.__setattr__(ctx, "log", spy)  # the context is frozen; this is a test
    try:
        ctx.every(0.01, sometimes_hangs, timeout=0.05)
    finally:
        release.set()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("all_test.py: sometimes_hangs timed out after 0.05 s (abandoned)")
    assert skipped.is_set()
    assert all("skipped: the previous call is still running" in line for line in lines[1:])
    assert calls == 2  # no second call while the first was still running


def test_every_returns_promptly_on_stop_during_a_hung_call() -> None:
    ctx = context()
    release = threading.Event()
    started = threading.Event()

    def hang() -> None:
        started.set()
        release.wait(DEADLINE)

    def stop_when_started() -> None:
        started.wait(DEADLINE)
        ctx.stop()

    threading.Thread(target=stop_when_started).start()
    begin = time.monotonic()
    try:
        ctx.every(0.01, hang, timeout=DEADLINE)
    finally:
        release.set()
    assert time.monotonic() - begin < 2.0  # the timeout was 10 s: stopping cut it short


@pytest.mark.parametrize(
    ("interval", "timeout", "max_backoff"), [(0, None, None), (1, 0, None), (1, None, 0.5)]
)
def test_every_rejects_bad_arguments(
    interval: float, timeout: float | None, max_backoff: float | None
) -> None:
    with pytest.raises(ValueError):
        context().every(interval, lambda: None, timeout, max_backoff=max_backoff)


# -- stopping and signals ------------------------------------------------------------------------


def test_stopping_from_a_mapping_leaves_signal_handlers_alone() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    ctx = context()
    assert not ctx.stopping.is_set()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_stopping_can_be_set_while_its_lock_is_held() -> None:
    """A signal handler runs between bytecodes, maybe while Event.wait holds the event's lock."""
    event = context().stopping
    done = threading.Event()

    def set_inside_lock() -> None:
        with event._cond:  # type: ignore[attr-defined]
            event.set()  # what a signal handler arriving at that moment does
        done.set()

    threading.Thread(target=set_inside_lock, daemon=True).start()
    assert done.wait(DEADLINE), "Event.set deadlocked on the event's own lock"
    assert event.is_set()


class Plugin:
    """A plugin script run as a real process, with its output lines read as they come."""

    def __init__(self, tmp_path: Path, body: str, environ: dict[str, str] | None = None) -> None:
        script = tmp_path / "all_probe.py"
        script.write_text(textwrap.dedent(body))
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, str(script)],
            env={
                **os.environ,
                **(env(PARENT_PID=str(os.getpid())) if environ is None else environ),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, wanted: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while wanted not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no line {wanted!r}; got {self.seen}"
            try:
                self.seen.append(self.lines.get(timeout=left))
            except queue.Empty:
                pass

    def wait(self) -> int:
        return self.proc.wait(DEADLINE)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(DEADLINE)


@pytest.fixture
def plugins(tmp_path: Path) -> Iterator[Callable[..., Plugin]]:
    started: list[Plugin] = []

    def start(body: str, environ: dict[str, str] | None = None) -> Plugin:
        plugin = Plugin(tmp_path, body, environ)
        started.append(plugin)
        return plugin

    yield start
    for plugin in started:
        plugin.close()


def test_sigterm_sets_stopping_and_ends_every(plugins: Callable[..., Plugin]) -> None:
    plugin = plugins(
        """
        from plugin_launcher.plugin import run

        def main(ctx):
            ctx.every(0.05, lambda: ctx.log("ready"))
            ctx.log(f"stopped cleanly: {ctx.role} {ctx.worker_id} {ctx.parent_alive()}")
            return 0

        run(main)
        """
    )
    plugin.expect("ready")
    plugin.proc.send_signal(signal.SIGTERM)
    assert plugin.wait() == 0
    plugin.expect("stopped cleanly: WORKER 1 True")


def test_sigint_interrupts_a_hung_call(plugins: Callable[..., Plugin]) -> None:
    plugin = plugins(
        """
        import threading
        from plugin_launcher.plugin import run

        def main(ctx):
            def hang():
                print("hanging", flush=True)
                threading.Event().wait()
            ctx.every(0.05, hang, timeout=600)
            ctx.log("left the loop")
            return 3

        run(main)
        """
    )
    plugin.expect("hanging")
    begin = time.monotonic()
    plugin.proc.send_signal(signal.SIGINT)
    assert plugin.wait() == 3
    assert time.monotonic() - begin < 5
    plugin.expect("left the loop")


def test_a_plugin_that_never_looks_at_stopping_dies_on_sigterm(
    plugins: Callable[..., Plugin],
) -> None:
    plugin = plugins(
        """
        import time
        from plugin_launcher.plugin import PluginContext

        ctx = PluginContext.from_env()
        print("ready", flush=True)
        time.sleep(600)
        """
    )
    plugin.expect("ready")
    plugin.proc.send_signal(signal.SIGTERM)
    assert plugin.wait() == -signal.SIGTERM


def test_a_second_signal_ends_a_stuck_plugin(plugins: Callable[..., Plugin]) -> None:
    plugin = plugins(
        """
        import time
        from plugin_launcher.plugin import PluginContext

        ctx = PluginContext.from_env()
        ctx.stopping
        print("ready", flush=True)
        while True:
            time.sleep(0.01)
            if ctx.stopping.is_set():
                print("ignoring the stop", flush=True)
                time.sleep(600)
        """
    )
    plugin.expect("ready")
    plugin.proc.send_signal(signal.SIGTERM)
    plugin.expect("ignoring the stop")
    plugin.proc.send_signal(signal.SIGTERM)
    assert plugin.wait() == -signal.SIGTERM


def test_run_reports_a_bad_environment_in_one_line(plugins: Callable[..., Plugin]) -> None:
    plugin = plugins(
        """
        from plugin_launcher.plugin import run
        run(lambda ctx: 0)
        """,
        environ=env(WORKER_COUNT="many"),
    )
    assert plugin.wait() == 2
    plugin.expect("all_probe.py: LMCACHE_PLUGIN_WORKER_COUNT: expected an integer >= 1, got 'many'")
    assert plugin.lines.empty() and len(plugin.seen) == 1


def test_run_reports_a_bad_option_in_one_line(plugins: Callable[..., Plugin]) -> None:
    plugin = plugins(
        """
        from plugin_launcher.plugin import run
        run(lambda ctx: ctx.option("port", str, required=True) and 0)
        """
    )
    assert plugin.wait() == 2
    plugin.expect(
        "all_test.py: LMCACHE_PLUGIN_CONFIG: extra_config.port: expected a string, got 9400"
    )


# -- import cost ---------------------------------------------------------------------------------


def test_kit_imports_only_the_standard_library() -> None:
    tree = ast.parse((ROOT / "src" / "plugin_launcher" / "plugin.py").read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "the kit must not import the rest of plugin_launcher"
            modules.add((node.module or "").split(".")[0])
    assert modules - {"__future__"} <= sys.stdlib_module_names


def test_importing_the_kit_loads_nothing_heavy() -> None:
    code = (
        "import sys, plugin_launcher.plugin; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('yaml', 'prometheus_client', 'psutil') or m.startswith('plugin_launcher.')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=DEADLINE
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['plugin_launcher.plugin']"
