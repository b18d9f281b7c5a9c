"""``run --status-addr``: GET /status (JSON) and GET /metrics (Prometheus) over real HTTP on
127.0.0.1 while real plugins run, restart and print."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from helpers import CLI, alive, read_pids, wait_for, write_plugin
from prometheus_client.parser import text_string_to_metric_families

SERVING = re.compile(r"serving status on http://([0-9.]+):(\d+)/status and /metrics")


def fetch(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def status(port: int) -> dict[str, dict[str, Any]]:
    code, kind, body = fetch(port, "/status")
    assert code == 200 and kind.startswith("application/json")
    entries = json.loads(body)
    assert isinstance(entries, list) and all(isinstance(e, dict) for e in entries)
    return {e["name"]: e for e in entries}


def metrics(port: int) -> dict[tuple[str, str], float]:
    """{(sample name, plugin label): value} parsed with prometheus_client's own parser."""
    code, kind, body = fetch(port, "/metrics")
    assert code == 200 and kind.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if "plugin" in sample.labels and "state" not in sample.labels:
                samples[(sample.name, sample.labels["plugin"])] = sample.value
    return samples


@pytest.fixture
def launcher(plugin_dir: Path, tmp_path: Path, tracker: Any) -> Any:
    """A CLI ``run`` with two plugins: one that keeps printing, one that crashes and restarts."""

    def start(addr: str) -> tuple[subprocess.Popen[bytes], int, str]:
        write_plugin(plugin_dir, "all_ticker.sh",
                     f"#!/bin/sh\necho $$ > {tmp_path}/ticker.pid\n"
                     "while :; do echo tick; sleep 0.05; done\n")
        write_plugin(plugin_dir, "all_crasher.sh",
                     f"#!/bin/sh\necho $$ >> {tmp_path}/crasher.pids\n"
                     "echo starting; echo oops >&2; exit 1\n")
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump({
            "plugin_locations": [str(plugin_dir)],
            "plugin_options": {"all_crasher.sh": {"restart": "on-failure", "max_restarts": 0,
                                                  "backoff": {"initial": 0.2, "max": 0.2}}},
        }))
        err_path = tmp_path / "stderr"
        with open(err_path, "w") as err:
            proc = tracker.popen([*CLI, "run", "--role", "worker", "--config", str(config),
                                  "--stop-timeout", "1", "--status-addr", addr],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        match = wait_for(lambda: SERVING.search(err_path.read_text()), 15,
                         message="the status address on stderr")
        return proc, int(match.group(2)), match.group(1)

    return start


def stop(proc: subprocess.Popen[bytes], tmp_path: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    pids = read_pids(tmp_path / "ticker.pid") + read_pids(tmp_path / "crasher.pids")
    assert not [p for p in pids if alive(p)]


def test_status_and_metrics_over_http_while_plugins_run(launcher: Any, tmp_path: Path) -> None:
    proc, port, host = launcher("127.0.0.1:0")
    assert host == "127.0.0.1"
    ticker_pid = wait_for(lambda: read_pids(tmp_path / "ticker.pid"), 10)[0]

    entries = wait_for(lambda: (s := status(port)) and s["all_ticker.sh"]["output_lines"] > 0
                       and s, 10, message="the ticker's first lines")
    assert set(entries) == {"all_ticker.sh", "all_crasher.sh"}
    ticker = entries["all_ticker.sh"]
    for key in ("name", "path", "pid", "state", "restarts", "output_lines", "started_at",
                "exit_code", "signal"):
        assert key in ticker
    assert ticker["pid"] == ticker_pid and ticker["state"] == "running"
    assert ticker["restarts"] == 0

    # values move as the crasher restarts and the ticker prints
    first = metrics(port)
    assert first[("plugin_up", "all_ticker.sh")] == 1.0
    seen = wait_for(lambda: (m := metrics(port))[("plugin_restarts_total", "all_crasher.sh")] >= 3
                    and m, 10, message="three restarts in /metrics")
    assert seen[("plugin_output_lines_total", "all_ticker.sh")] > \
        first[("plugin_output_lines_total", "all_ticker.sh")]
    assert seen[("plugin_output_lines_total", "all_crasher.sh")] >= 2 * 3  # two lines per run
    assert seen[("plugin_up", "all_ticker.sh")] == 1.0

    crasher = status(port)["all_crasher.sh"]
    assert crasher["restarts"] >= 3
    assert crasher["exit_code"] == 1 or crasher["state"] == "running"
    assert len(read_pids(tmp_path / "crasher.pids")) >= crasher["restarts"]

    # the text format itself, as a scraper reads it
    code, _, body = fetch(port, "/metrics")
    assert 'plugin_up{plugin="all_ticker.sh"} 1.0' in body
    assert re.search(r'^plugin_restarts_total\{plugin="all_crasher.sh"\} \d+\.0$', body, re.M)
    assert re.search(r'^plugin_output_lines_total\{plugin="all_ticker.sh"\} \d+\.0$', body, re.M)

    for path in ("/nope", "/status/extra", "/metricsx", "/index.html"):
        assert fetch(port, path)[0] == 404, path
    assert fetch(port, "/status?pretty=1")[0] == 200
    stop(proc, tmp_path)


def test_plugin_up_drops_to_zero_while_waiting_to_restart(launcher: Any, tmp_path: Path) -> None:
    proc, port, _ = launcher("127.0.0.1:0")
    down = wait_for(lambda: status(port)["all_crasher.sh"]["state"] == "backoff"
                    and metrics(port).get(("plugin_up", "all_crasher.sh")) == 0.0, 10,
                    message="the crasher to be down between runs")
    assert down
    stop(proc, tmp_path)


@pytest.mark.parametrize("addr", ["0", ":0"])
def test_a_port_alone_binds_loopback_only(launcher: Any, tmp_path: Path, addr: str) -> None:
    proc, port, host = launcher(addr)
    assert host == "127.0.0.1"
    listening = [c for c in psutil.Process(proc.pid).net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN]
    assert [(c.laddr.ip, c.laddr.port) for c in listening] == [("127.0.0.1", port)]
    assert "all_ticker.sh" in status(port)
    stop(proc, tmp_path)


@pytest.mark.parametrize("addr", ["127.0.0.1:notaport", "127.0.0.1:70000", "256.1.1.1:0"])
def test_bad_status_address_is_a_usage_error(
    plugin_dir: Path, tmp_path: Path, addr: str,
) -> None:
    marker = tmp_path / "ran"
    write_plugin(plugin_dir, "all_x.sh", f"#!/bin/sh\necho $$ >> {marker}\nexec sleep 30\n")
    result = subprocess.run([*CLI, "run", "--role", "worker", "--plugin-location",
                             str(plugin_dir), "--stop-timeout", "1", "--status-addr", addr],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert "error: --status-addr" in result.stderr
    assert not [p for p in read_pids(marker) if alive(p)]


def test_bad_status_address_starts_no_plugin(plugin_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    write_plugin(plugin_dir, "all_x.sh", f"#!/bin/sh\necho $$ >> {marker}\nexec sleep 30\n")
    result = subprocess.run([*CLI, "run", "--role", "worker", "--plugin-location",
                             str(plugin_dir), "--stop-timeout", "1", "--status-addr", "1:70000"],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert not marker.exists(), "a usage error is reported before any plugin starts"


def test_bad_status_address_message_names_the_flag_once(plugin_dir: Path) -> None:
    result = subprocess.run([*CLI, "run", "--role", "worker", "--plugin-location",
                             str(plugin_dir), "--status-addr", "127.0.0.1:70000"],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert result.stderr.count("--status-addr") == 1, result.stderr
