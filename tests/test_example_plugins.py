"""End-to-end tests of the example plugins, run by the real launcher against real sockets.

Every test starts real processes, talks to them only over 127.0.0.1 on ports the kernel picked, and
stops and reaps every process it started, even when it fails.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from plugin_launcher import PluginLauncher

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "examples" / "plugins"
DEADLINE = 15.0  # seconds; only reached when something is wrong


def wait_until(condition: Callable[[], Any], what: Callable[[], str] | str) -> Any:
    """Poll ``condition`` until it returns something true; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + DEADLINE
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.02)


def output(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    """The lines plugin ``name`` printed, as the launcher logged them (without the prefix)."""
    prefix = f"[{name}] "
    messages = [r.getMessage() for r in list(caplog.records) if r.name == "plugin_launcher"]
    return [m[len(prefix) :] for m in messages if m.startswith(prefix)]


@pytest.fixture
def launch(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[..., PluginLauncher]]:
    """Start a PluginLauncher; every one started is stopped (and its plugins reaped) at the end."""
    caplog.set_level(logging.INFO, logger="plugin_launcher")
    started: list[PluginLauncher] = []

    def start(
        location: Path,
        extra_config: dict[str, Any],
        role: str = "worker",
        worker_id: int | None = 0,
        worker_count: int = 1,
    ) -> PluginLauncher:
        config = {"plugin_locations": [str(location)], "extra_config": extra_config}
        launcher = PluginLauncher(config, role=role, worker_id=worker_id, worker_count=worker_count)
        started.append(launcher)
        launcher.launch_plugins()
        return launcher

    yield start
    for launcher in started:
        plugins = launcher.plugins  # stop_plugins() forgets them
        launcher.stop_plugins(timeout=2.0)
        assert not any(p.running for p in plugins)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_pair() -> int:
    """A port P such that P and P + 1 are both free (the exporters of workers 0 and 1)."""
    for _ in range(100):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free ports")


# -- all_metrics_reporter.py ---------------------------------------------------------------------


def scrape(port: int) -> dict[str, tuple[dict[str, str], float]] | None:
    """The samples of one scrape by name, or None while nothing listens yet."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None
    return {
        sample.name: (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_reporter_exports_the_parent_process_per_worker(
    launch: Callable[..., PluginLauncher], caplog: pytest.LogCaptureFixture
) -> None:
    base = free_port_pair()
    extra = {"metrics_port": base, "metrics_addr": "127.0.0.1"}
    location = PLUGINS / "all_metrics_reporter.py"
    launchers = [launch(location, extra, worker_id=i, worker_count=2) for i in (0, 1)]

    # Give this (the served) process things the exporters can only have seen here.
    me = psutil.Process()
    extra_fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(40)]
    release = threading.Event()
    extra_threads = [threading.Thread(target=release.wait, daemon=True) for _ in range(5)]
    for thread in extra_threads:
        thread.start()
    try:
        for worker_id in (0, 1):
            port = base + worker_id
            wait_until(lambda port=port: scrape(port), f"the exporter on port {port}")
            with me.oneshot():
                cpu_before = sum(me.cpu_times()[:2])
                threads_before, fds_before = me.num_threads(), me.num_fds()
            samples = scrape(port)
            with me.oneshot():
                cpu_after = sum(me.cpu_times()[:2])
                threads_after, fds_after = me.num_threads(), me.num_fds()
                rss = me.memory_info().rss
            assert samples is not None

            def value(name: str, worker_id: int = worker_id, samples: Any = samples) -> float:
                labels, number = samples[name]
                assert labels == {"role": "WORKER", "worker_id": str(worker_id)}
                return number

            assert value("lmcache_process_up") == 1
            assert value("lmcache_process_start_time_seconds") == pytest.approx(
                me.create_time(), abs=0.01
            )
            assert (
                cpu_before - 0.02 <= value("lmcache_process_cpu_seconds_total") <= cpu_after + 0.02
            )
            assert 0.5 * rss < value("lmcache_process_resident_memory_bytes") < 2 * rss
            threads = value("lmcache_process_threads")
            assert (
                min(threads_before, threads_after) - 1
                <= threads
                <= max(threads_before, threads_after) + 1
            )
            assert threads >= len(extra_threads) + 1
            fds = value("lmcache_process_open_fds")
            assert min(fds_before, fds_after) - 2 <= fds <= max(fds_before, fds_after) + 2
            assert fds >= len(extra_fds)
    finally:
        release.set()
        for fd in extra_fds:
            os.close(fd)

    for port in (base, base + 1):
        line = f"exporting metrics of PID {os.getpid()} on http://127.0.0.1:{port}/metrics"
        wait_until(lambda line=line: line in output(caplog, "all_metrics_reporter.py"), line)
    for launcher in launchers:
        plugins = launcher.plugins  # stop_plugins() forgets them
        launcher.stop_plugins()
        assert [p.returncode for p in plugins] == [0]
    assert scrape(base) is None and scrape(base + 1) is None


def test_metrics_reporter_reports_a_busy_port_in_one_line(
    launch: Callable[..., PluginLauncher], caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        extra = {"metrics_port": port, "metrics_addr": "127.0.0.1"}
        launcher = launch(PLUGINS / "all_metrics_reporter.py", extra)
        plugin = launcher.plugins[0]
        lines = wait_until(
            lambda: not plugin.running and output(caplog, "all_metrics_reporter.py"),
            "the plugin to exit",
        )
    assert plugin.returncode == 1
    assert len(lines) == 1 and lines[0].startswith(f"cannot listen on 127.0.0.1:{port}: ")


def test_metrics_reporter_without_port_says_what_to_set(
    launch: Callable[..., PluginLauncher], caplog: pytest.LogCaptureFixture
) -> None:
    launcher = launch(PLUGINS / "all_metrics_reporter.py", {"metrics_port": None})
    plugin = launcher.plugins[0]
    wait_until(
        lambda: not plugin.running and output(caplog, "all_metrics_reporter.py"),
        "the plugin to exit",
    )
    assert plugin.returncode == 0
    assert output(caplog, "all_metrics_reporter.py") == [
        "set extra_config.metrics_port to export this process's metrics; exiting"
    ]


# -- all_heartbeat.py ----------------------------------------------------------------------------


class BeatServer:
    """A real HTTP endpoint that records the JSON bodies POSTed to it."""

    def __init__(self, port: int = 0) -> None:
        beats: list[dict[str, Any]] = []
        self.beats = beats

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                assert self.headers.get("Content-Type") == "application/json"
                beats.append({"path": self.path, **json.loads(body)})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/beat"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def of(self, worker_id: int, event: str | None = None) -> list[dict[str, Any]]:
        return [
            b
            for b in list(self.beats)
            if b["worker_id"] == worker_id and (event is None or b["event"] == event)
        ]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(DEADLINE)


@pytest.fixture
def beat_servers() -> Iterator[Callable[..., BeatServer]]:
    servers: list[BeatServer] = []

    def start(port: int = 0) -> BeatServer:
        servers.append(BeatServer(port))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_heartbeat_registers_each_worker_and_leaves_on_stop(
    launch: Callable[..., PluginLauncher], beat_servers: Callable[..., BeatServer]
) -> None:
    server = beat_servers()
    extra = {"heartbeat_url": server.url, "heartbeat_interval": 0.2, "heartbeat_timeout": 2}
    began = time.time()
    launchers = [
        launch(PLUGINS / "all_heartbeat.py", extra, worker_id=i, worker_count=2) for i in (0, 1)
    ]
    for worker_id in (0, 1):
        wait_until(
            lambda w=worker_id: len(server.of(w, "alive")) >= 2,
            lambda w=worker_id: f"two beats from worker {w}; got {server.of(w)}",
        )
    for launcher in launchers:
        plugins = launcher.plugins  # stop_plugins() forgets them
        launcher.stop_plugins()
        assert [p.returncode for p in plugins] == [0]

    for worker_id in (0, 1):
        beats = server.of(worker_id)
        assert [b["event"] for b in beats][-1] == "leaving"
        assert {b["event"] for b in beats[:-1]} == {"alive"}
        for beat in beats:
            assert beat["path"] == "/beat"
            assert beat["role"] == "WORKER"
            assert beat["worker_count"] == 2
            assert beat["pid"] == os.getpid()  # the served process, not the plugin
            assert beat["parent_alive"] is True
            assert beat["host"] == socket.gethostname()
            assert beat["plugin"] == "all_heartbeat.py"
            assert began <= beat["time"] <= time.time()
        times = [b["time"] for b in beats]
        assert times == sorted(times)


FAILURE = re.compile(
    r"^all_heartbeat\.py: heartbeat failed: URLError: <urlopen error \[Errno 111\] "
    r"Connection refused> \(failure (\d+) in a row, next call in ([\d.]+) s\)$"
)


def test_heartbeat_survives_a_down_endpoint_and_recovers(
    launch: Callable[..., PluginLauncher],
    beat_servers: Callable[..., BeatServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()  # nothing listens there yet
    url = f"http://127.0.0.1:{port}/beat"
    extra = {"heartbeat_url": url, "heartbeat_interval": 0.05, "heartbeat_max_backoff": 0.2}
    launcher = launch(PLUGINS / "all_heartbeat.py", extra)

    def failures() -> list[re.Match[str]]:
        return [m for m in map(FAILURE.match, output(caplog, "all_heartbeat.py")) if m]

    wait_until(
        lambda: len(failures()) >= 4,
        lambda: f"4 failures; got {output(caplog, 'all_heartbeat.py')}",
    )
    assert all(p.running for p in launcher.plugins)
    server = beat_servers(port)  # the endpoint comes back
    wait_until(lambda: server.of(0, "alive"), "a beat after the endpoint came back")
    plugins = launcher.plugins  # stop_plugins() forgets them
    launcher.stop_plugins()
    assert [p.returncode for p in plugins] == [0]
    assert server.of(0)[-1]["event"] == "leaving"

    lines = output(caplog, "all_heartbeat.py")
    assert lines[0] == f"sending heartbeats to {url} every 0.05 s"
    matches = [FAILURE.match(line) for line in lines[1:]]
    assert all(matches), f"one line per failure and nothing else: {lines}"
    counts = [int(m.group(1)) for m in matches if m]
    assert counts == list(range(1, len(counts) + 1))  # consecutive failures, counted
    delays = [float(m.group(2)) for m in matches if m]
    assert delays[:3] == [0.1, 0.2, 0.2]  # backing off up to heartbeat_max_backoff


def test_heartbeat_without_url_says_what_to_set(
    launch: Callable[..., PluginLauncher], caplog: pytest.LogCaptureFixture
) -> None:
    launcher = launch(PLUGINS / "all_heartbeat.py", {})
    wait_until(
        lambda: not launcher.plugins[0].running and output(caplog, "all_heartbeat.py"),
        "the plugin to exit",
    )
    assert launcher.plugins[0].returncode == 0
    assert output(caplog, "all_heartbeat.py") == [
        "set extra_config.heartbeat_url to send heartbeats; exiting"
    ]


# -- scheduler_log_reporter.py -------------------------------------------------------------------


class SyslogListener:
    """A UDP socket that collects the syslog messages sent to it."""

    MESSAGE = re.compile(r"^<(\d+)>(\S+): (.*)\x00?$", re.DOTALL)

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = int(self.sock.getsockname()[1])
        self.messages: list[tuple[int, str, str]] = []  # priority, tag, text

    def receive(self) -> list[str]:
        try:
            while True:
                data = self.sock.recv(65536).decode()
                match = self.MESSAGE.match(data)
                assert match, data
                self.messages.append((int(match[1]), match[2], match[3].rstrip("\x00")))
        except TimeoutError:
            pass
        return [text for _, _, text in self.messages]

    def expect(self, *lines: str) -> None:
        wait_until(
            lambda: all(line in self.receive() for line in lines),
            lambda: f"{lines} over syslog; got {self.receive()}",
        )


def test_log_reporter_forwards_new_lines_across_rotation_and_truncation(
    launch: Callable[..., PluginLauncher], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    log_file = tmp_path / "scheduler.log"
    log_file.write_text("written before the reporter started\n")
    listener = SyslogListener()
    try:
        extra = {
            "log_file": str(log_file),
            "syslog_host": "127.0.0.1",
            "syslog_port": listener.port,
            "log_poll_interval": 0.05,
        }
        launcher = launch(PLUGINS / "scheduler_log_reporter.py", extra, role="scheduler")
        wait_until(
            lambda: output(caplog, "scheduler_log_reporter.py"),
            "the reporter to start following the file",
        )
        assert output(caplog, "scheduler_log_reporter.py") == [
            f"following {log_file}, forwarding new lines to syslog at 127.0.0.1:{listener.port}"
        ]
        with open(log_file, "a") as writer:
            writer.write("first line\n2024-01-01 ERROR something broke\n")
            writer.flush()
            listener.expect("first line", "2024-01-01 ERROR something broke")
            os.rename(log_file, tmp_path / "scheduler.log.1")  # rotation, as logrotate does it
            writer.write("last line of the old file\n")  # the writer has not reopened yet
        log_file.write_text("first line of the new file\n")
        listener.expect("last line of the old file", "first line of the new file")
        log_file.write_text("after truncation, longer than what was there\n")  # copytruncate
        listener.expect("after truncation, longer than what was there")
        plugins = launcher.plugins  # stop_plugins() forgets them
        launcher.stop_plugins()
        assert [p.returncode for p in plugins] == [0]

        assert listener.receive() == [
            "first line",
            "2024-01-01 ERROR something broke",
            "last line of the old file",
            "first line of the new file",
            "after truncation, longer than what was there",
        ]
        tags = {tag for _, tag, _ in listener.messages}
        assert tags == {f"lmcache-scheduler[{os.getpid()}]"}
        priorities = [priority for priority, _, _ in listener.messages]
        assert priorities[:2] == [8 + 6, 8 + 3]  # facility user; info, then error
    finally:
        listener.sock.close()


def test_log_reporter_is_only_for_the_scheduler(launch: Callable[..., PluginLauncher]) -> None:
    launcher = launch(PLUGINS / "scheduler_log_reporter.py", {}, role="worker")
    assert launcher.plugins == []


# -- the documentation examples, through the API and the CLI -------------------------------------

DOC_EXTRA = {"foo_interval": 0.2, "all_plugin_interval": 0.2}
CASES = {  # (role, worker ID) -> the documentation examples that must start, and how
    ("scheduler", 0): {
        "scheduler_foo_plugin.py": "scheduler_foo_plugin started: role=SCHEDULER worker_id=0 "
        "worker_count=2",
        "all_plugin.sh": "all_plugin started: role=SCHEDULER worker_id=0 worker_count=2",
    },
    ("worker", 0): {
        "all_plugin.sh": "all_plugin started: role=WORKER worker_id=0 worker_count=2",
        "worker_0_test.sh": "worker_0_test started: worker_id=0",
    },
    ("worker", 1): {
        "all_plugin.sh": "all_plugin started: role=WORKER worker_id=1 worker_count=2",
    },
}
RUNNING = {  # a line each prints while it runs: proof it read its interval and loops
    "scheduler_foo_plugin.py": "scheduler_foo_plugin tick 1",
    "all_plugin.sh": "all_plugin alive",
    "worker_0_test.sh": None,
}
STOPPING = {
    "scheduler_foo_plugin.py": "scheduler_foo_plugin stopping",
    "all_plugin.sh": "all_plugin stopping",
    "worker_0_test.sh": "worker_0_test stopping",
}
UNCONFIGURED = {  # the use-case plugins, left unconfigured: one line each, then exit 0
    "all_heartbeat.py": "set extra_config.heartbeat_url to send heartbeats; exiting",
    "all_metrics_reporter.py": "set extra_config.metrics_port to export this process's metrics; "
    "exiting",
    "scheduler_log_reporter.py": "set extra_config.log_file and extra_config.syslog_host to "
    "forward a log; exiting",
}


def unconfigured(role: str) -> dict[str, str]:
    return {n: line for n, line in UNCONFIGURED.items() if n.startswith(("all_", role))}


def all_seen(lines: Callable[[str], list[str]], role: str, worker_id: int) -> bool:
    """Every expected plugin started, loops, and every unconfigured one said what to set."""
    for name, started in CASES[role, worker_id].items():
        running = RUNNING[name]
        got = lines(name)
        if started not in got or (running and not any(x.startswith(running) for x in got)):
            return False
    return all(lines(name) == [line] for name, line in unconfigured(role).items())


@pytest.mark.parametrize(("role", "worker_id"), list(CASES))
def test_documentation_examples_through_the_api(
    launch: Callable[..., PluginLauncher],
    caplog: pytest.LogCaptureFixture,
    role: str,
    worker_id: int,
) -> None:
    launcher = launch(PLUGINS, DOC_EXTRA, role=role, worker_id=worker_id, worker_count=2)
    expected = CASES[role, worker_id]
    assert {p.name for p in launcher.plugins} == {*expected, *unconfigured(role)}
    wait_until(
        lambda: (
            all_seen(lambda name: output(caplog, name), role, worker_id)
            and not any(p.running for p in launcher.plugins if p.name in UNCONFIGURED)
        ),
        lambda: f"the started lines; got {[r.getMessage() for r in caplog.records]}",
    )
    plugins = launcher.plugins  # stop_plugins() forgets them
    began = time.monotonic()
    launcher.stop_plugins()
    assert time.monotonic() - began < 4.0  # they stop at once: no SIGKILL after 5 s
    assert plugins
    for plugin in plugins:
        assert plugin.returncode == 0, plugin.name
        if plugin.name in STOPPING:
            assert output(caplog, plugin.name)[-1] == STOPPING[plugin.name]


class CliRun:
    """``python -m plugin_launcher run`` as a real subprocess, its output read as it comes."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "plugin_launcher", *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for reader in self.readers:
            reader.start()
        self.descendants: list[psutil.Process] = []

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    def lines(self, name: str) -> list[str]:
        prefix = f"[{name}] "
        return [line[len(prefix) :] for line in list(self.stdout) if line.startswith(prefix)]

    def close(self) -> None:
        """Kill whatever is left: the CLI and every plugin it started."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(DEADLINE)
        for process in self.descendants:
            try:
                process.kill()
            except psutil.Error:
                pass
        for process in self.descendants:
            try:
                process.wait(DEADLINE)
            except psutil.Error:
                pass
        for reader in self.readers:
            reader.join(DEADLINE)


@pytest.mark.parametrize(
    ("role", "worker_id", "stop_signal"),
    [("scheduler", 0, signal.SIGINT), ("worker", 0, signal.SIGTERM), ("worker", 1, signal.SIGINT)],
)
def test_documentation_examples_through_the_cli(
    tmp_path: Path, role: str, worker_id: int, stop_signal: signal.Signals
) -> None:
    config = tmp_path / "lmcache.yaml"
    # a relative location, resolved against the working directory, as in examples/lmcache.yaml
    config.write_text(
        yaml.safe_dump({"plugin_locations": ["examples/plugins"], "extra_config": DOC_EXTRA})
    )
    args = ["run", "--role", role, "--worker-id", str(worker_id), "--worker-count", "2"]
    cli = CliRun([*args, "--config", str(config)], cwd=ROOT)
    try:
        wait_until(
            lambda: all_seen(cli.lines, role, worker_id),
            lambda: f"the started lines; stdout {cli.stdout}, stderr {cli.stderr}",
        )
        cli.descendants = psutil.Process(cli.proc.pid).children(recursive=True)
        assert cli.descendants, "the plugins run as child processes"
        cli.proc.send_signal(stop_signal)
        assert cli.proc.wait(DEADLINE) == 0, cli.stderr
        for reader in cli.readers:
            reader.join(DEADLINE)
        seen = {line.split("] ", 1)[0][1:] for line in cli.stdout if line.startswith("[")}
        expected = CASES[role, worker_id]
        assert seen == {*expected, *unconfigured(role)}
        for name in expected:
            assert cli.lines(name)[-1] == STOPPING[name]
        assert not [p for p in cli.descendants if p.is_running() and p.status() != "zombie"]
        assert not any("SIGKILL" in line for line in cli.stderr), cli.stderr
    finally:
        cli.close()


def test_demo_config_selects_the_examples_from_the_repository_root() -> None:
    data = yaml.safe_load((ROOT / "examples" / "lmcache.yaml").read_text())
    assert data["plugin_locations"] == ["examples/plugins"]
    assert data["extra_config"] == {"foo_interval": 2,
                                    "metrics_port": {"scheduler": 9400, "worker": 9401}}
    listing = subprocess.run(
        [sys.executable, "-m", "plugin_launcher", "list", "--role", "scheduler"]
        + ["--config", "examples/lmcache.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert listing.returncode == 0, listing.stderr
    runs = {line.split()[1] for line in listing.stdout.splitlines() if line.startswith("run ")}
    assert runs == {
        "all_heartbeat.py",
        "all_metrics_reporter.py",
        "all_plugin.sh",
        "scheduler_foo_plugin.py",
        "scheduler_log_reporter.py",
    }


def test_example_files_are_safe_to_run() -> None:
    """The launcher refuses plugins that others may write; a shebang needs the executable bit."""
    for path in PLUGINS.iterdir():
        if path.suffix in (".py", ".sh"):
            mode = path.stat().st_mode
            assert not mode & 0o022, f"{path.name} is writable by group or others"
            if path.read_bytes().startswith(b"#!"):
                assert mode & 0o111, f"{path.name} has a shebang but is not executable"
