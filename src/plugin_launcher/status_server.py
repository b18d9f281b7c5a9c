"""``GET /status`` (JSON), ``GET /metrics`` (Prometheus), ``/healthz`` and ``/readyz`` (probes)
and ``/`` (a page for people; status_page.py) for a running launcher.

A threaded server, so an idle or slow client cannot hold up everyone else: each connection gets
a daemon thread and a socket timeout, at most ``MAX_HANDLERS`` run at once (a connection beyond
that waits in the listen queue, and is closed if no handler frees up within ``SLOT_WAIT``).
Handlers serve the snapshot the supervisor publishes, so they never wait for its thread.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from typing import Any

from .status_page import PAGE, PAGE_HEADERS, health, readiness

log = logging.getLogger("plugin_launcher.status")
StatusFn = Callable[[], list[dict[str, Any]]]
CLIENT_TIMEOUT = 5.0  # seconds a client may take per read or write before it is dropped
MAX_HANDLERS = 64  # connections served at once
SLOT_WAIT = 1.0  # how long a new connection may wait for a free handler before it is closed
LISTEN_BACKLOG = 1024  # connections the kernel queues for us (capped by net.core.somaxconn)


def label_text(text: str) -> str:
    """A name as valid UTF-8 text: bytes of a non-UTF-8 file name become ``\\xff`` escapes
    (distinct names stay distinct, which a Prometheus label needs)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class StatusHTTPServer(ThreadingHTTPServer):
    """Daemon handler threads, a bounded number of them, and a deep listen queue."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_HANDLERS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(timeout=SLOT_WAIT):  # every handler busy with slow clients
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("status request from %s failed", client_address, exc_info=True)


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT``; the host defaults to 127.0.0.1 (never all interfaces
    unless asked)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--status-addr: expected HOST:PORT, got {text!r}")
    return host, int(port)


def render_metrics(status: list[dict[str, Any]]) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import Collector

    class StatusCollector(Collector):
        def collect(self) -> Iterator[Any]:
            up = GaugeMetricFamily("plugin_up", "1 if the plugin process is running",
                                   labels=["plugin"])
            restarts = CounterMetricFamily("plugin_restarts", "Restarts of the plugin",
                                           labels=["plugin"])
            lines = CounterMetricFamily("plugin_output_lines", "Lines the plugin has written",
                                        labels=["plugin"])
            state = GaugeMetricFamily("plugin_state", "1 for the plugin's current state",
                                      labels=["plugin", "state"])
            ready = GaugeMetricFamily("plugin_ready", "1 once the plugin sent READY=1 in this "
                                      "run (sd_notify)", labels=["plugin"])
            watchdog = GaugeMetricFamily("plugin_watchdog_seconds", "The plugin's watchdog "
                                         "period (plugins with a watchdog)", labels=["plugin"])
            left = GaugeMetricFamily("plugin_watchdog_remaining_seconds", "Seconds until the "
                                     "plugin misses its watchdog", labels=["plugin"])
            text = GaugeMetricFamily("plugin_status_text", "1, with the plugin's last STATUS= "
                                     "text as a label (at most 200 characters)",
                                     labels=["plugin", "status"])
            for entry in status:
                name = label_text(entry["name"])
                alive = entry["state"] in ("starting", "running", "stopping")
                up.add_metric([name], 1.0 if alive else 0.0)
                restarts.add_metric([name], entry["restarts"])
                lines.add_metric([name], entry["output_lines"])
                state.add_metric([name, entry["state"]], 1.0)
                ready.add_metric([name], 1.0 if entry.get("ready") else 0.0)
                if entry.get("watchdog") is not None:
                    watchdog.add_metric([name], float(entry["watchdog"]))
                if entry.get("watchdog_left") is not None:
                    left.add_metric([name], float(entry["watchdog_left"]))
                if entry.get("status_text") is not None:
                    text.add_metric([name, label_text(str(entry["status_text"]))[:200]], 1.0)
            yield from (up, restarts, lines, state, ready, watchdog, left, text)

    registry = CollectorRegistry()
    registry.register(StatusCollector())
    return generate_latest(registry)


def serve_status(status: StatusFn, host: str, port: int) -> HTTPServer:
    """Serve in a daemon thread; returns the server (``server.server_address`` has the port)."""

    class Handler(BaseHTTPRequestHandler):
        timeout = CLIENT_TIMEOUT  # an idle or slow client is dropped, never waited for

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            code = 200
            headers = {"Cache-Control": "no-store"}
            if path == "/status":
                body = json.dumps(status(), indent=1).encode()
                kind = "application/json"
            elif path == "/metrics":
                body = render_metrics(status())
                kind = "text/plain; version=0.0.4; charset=utf-8"
            elif path in ("/healthz", "/readyz"):
                code, line = (health if path == "/healthz" else readiness)(status())
                body, kind = f"{line}\n".encode(), "text/plain; charset=utf-8"
            elif path == "/":
                body, kind, headers = PAGE, PAGE_HEADERS["Content-Type"], PAGE_HEADERS
            else:
                self.send_error(404, "try /, /status, /metrics, /healthz or /readyz")
                return
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            for key, value in headers.items():
                if key != "Content-Type":
                    self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("status request: " + format, *args)

    server = StatusHTTPServer((host, port), Handler)
    thread = threading.Thread(target=server.serve_forever, name="plugin-status", daemon=True)
    thread.start()
    return server
