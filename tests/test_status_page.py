"""``/healthz``, ``/readyz`` and the status page at ``/``: the rules as tables, the HTTP answers,
and the page in a real headless Chromium driven through chromedriver's W3C HTTP API (standard
library only).  Without Chromium the browser tests are skipped, with the reason shown (-ra)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import start, wait_for, write_plugin

from plugin_launcher import PluginLauncher
from plugin_launcher.status_page import PAGE, PAGE_HEADERS, health, readiness
from plugin_launcher.status_server import serve_status

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT = os.environ.get("STATUS_PAGE_SCREENSHOT")  # set to refresh docs/status-page.png


def entry(name: str = "all_x.sh", state: str = "running", **more: Any) -> dict[str, Any]:
    return {"name": name, "state": state, "returncode": None, "exit_code": None,
            "signal": None, "error": None, "change": None, "ready": False, "ready_mode": None,
            **more}


# ------------------------------------------------------------------------------ the rules
@pytest.mark.parametrize(("status", "expected"), [
    ([], (200, "ok")),
    ([entry(), entry("b", "starting"), entry("c", "backoff", returncode=1, exit_code=1),
      entry("d", "standby"), entry("e", "stopped"), entry("f", "stopping")], (200, "ok")),
    ([entry(state="exited", returncode=0, exit_code=0)], (200, "ok")),  # a one-shot, done
    ([entry(state="failed", returncode=1, exit_code=1, error=None)],
     (503, "plugin all_x.sh failed (exited with code 1; gave up)")),
    ([entry(state="failed", error="cannot start bash: No such file")],
     (503, "plugin all_x.sh failed (cannot start bash: No such file; gave up)")),
    ([entry(state="exited", returncode=-9, signal="SIGKILL")],
     (503, "plugin all_x.sh killed by SIGKILL and is not restarted")),
    ([entry("a", "failed", returncode=2, exit_code=2), entry("b", "failed", returncode=1,
                                                           exit_code=1)],
     (503, "plugin a failed (exited with code 2; gave up) (and 1 more)")),
    ([entry(state="failed", returncode=1, exit_code=1, change="removed")], (200, "ok")),
    ([entry("x\n<b>", "failed", returncode=1, exit_code=1)],  # one line, whatever the name
     (503, "plugin x\\n<b> failed (exited with code 1; gave up)")),
])
def test_health(status: list[dict[str, Any]], expected: tuple[int, str]) -> None:
    assert health(status) == expected


@pytest.mark.parametrize(("status", "expected"), [
    ([], (200, "ready")),
    ([entry()], (200, "ready")),  # no ready: notify: nothing to wait for
    ([entry(ready_mode="notify", ready=True)], (200, "ready")),
    ([entry(state="starting", ready_mode="notify")],
     (503, "plugin all_x.sh is not ready (starting; no READY=1 yet)")),
    ([entry(state="backoff", ready_mode="notify", ready=False)],
     (503, "plugin all_x.sh is not ready (backoff; no READY=1 yet)")),
    ([entry(state="standby", ready_mode="notify")], (200, "ready")),  # runs elsewhere
    ([entry(state="exited", ready_mode="notify", returncode=0)], (200, "ready")),
    ([entry(state="failed", ready_mode="notify", returncode=1)],
     (503, "plugin all_x.sh is not ready (failed; no READY=1 yet)")),
])
def test_readiness(status: list[dict[str, Any]], expected: tuple[int, str]) -> None:
    assert readiness(status) == expected


# ------------------------------------------------------------------------------- over HTTP
def fetch(port: int, path: str) -> tuple[int, dict[str, str], str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, dict(answer.headers), answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


@pytest.fixture
def fake_server() -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """A status server over a list the test changes at will."""
    status: list[dict[str, Any]] = []
    server = serve_status(lambda: list(status), "127.0.0.1", 0)
    yield server.server_address[1], status
    server.shutdown()
    server.server_close()


def test_probe_endpoints_follow_the_status(fake_server: tuple[int, list[dict[str, Any]]]
                                           ) -> None:
    port, status = fake_server
    status[:] = [entry(state="starting", ready_mode="notify")]
    assert fetch(port, "/healthz")[::2] == (200, "ok\n")
    code, headers, body = fetch(port, "/readyz")
    assert (code, body) == (503, "plugin all_x.sh is not ready (starting; no READY=1 yet)\n")
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    status[:] = [entry(ready_mode="notify", ready=True)]
    assert fetch(port, "/readyz")[::2] == (200, "ready\n")
    status[:] = [entry(state="failed", returncode=1, exit_code=1)]
    assert fetch(port, "/healthz")[::2] == (503, "plugin all_x.sh failed (exited with code 1; "
                                                 "gave up)\n")


def test_page_is_self_contained(fake_server: tuple[int, list[dict[str, Any]]]) -> None:
    port, _ = fake_server
    code, headers, body = fetch(port, "/")
    assert code == 200 and body.encode() == PAGE
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    policy = headers["Content-Security-Policy"]
    assert policy == PAGE_HEADERS["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    script = re.search(r"<script>(.*)</script>", body, re.S)
    assert script is not None
    digest = base64.b64encode(hashlib.sha256(script.group(1).encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in policy  # exactly our script may run
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", body)  # nothing from elsewhere
    assert "innerHTML" not in body and "textContent" in body


# ----------------------------------------------------------------------- in a real browser
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Browser:
    """Headless Chromium through chromedriver's W3C WebDriver HTTP API (no selenium)."""

    def __init__(self, profile: Path) -> None:
        assert CHROMEDRIVER is not None and CHROMIUM is not None
        self.port = free_port()
        self.driver = subprocess.Popen([CHROMEDRIVER, f"--port={self.port}"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.session = ""
        try:
            wait_for(self._driver_ready, 20, interval=0.1, message="chromedriver to answer")
            args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                    f"--user-data-dir={profile}", "--window-size=1200,520"]
            answer = self._call("POST", "/session", {"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}}})
            self.session = answer["sessionId"]
        except BaseException:
            self.close()
            raise

    def _driver_ready(self) -> bool:
        try:
            return bool(self._call("GET", "/status").get("ready"))
        except OSError:
            return False

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                         method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            return json.loads(answer.read())["value"]

    def get(self, url: str) -> None:
        self._call("POST", f"/session/{self.session}/url", {"url": url})

    def run(self, script: str) -> Any:
        return self._call("POST", f"/session/{self.session}/execute/sync",
                          {"script": script, "args": []})

    def screenshot(self, path: Path) -> None:
        png = base64.b64decode(self._call("GET", f"/session/{self.session}/screenshot"))
        path.write_bytes(png)

    def close(self) -> None:
        if self.session:
            try:
                self._call("DELETE", f"/session/{self.session}")
            except OSError:
                pass
        self.driver.terminate()
        try:
            self.driver.wait(10)
        except subprocess.TimeoutExpired:
            self.driver.kill()
            self.driver.wait()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("Chromium or chromedriver not installed (.ci/run installs chromium and "
                    "chromium-driver with apt): the status page was NOT tested in a browser")
    b = Browser(tmp_path / "profile")
    yield b
    b.close()


HOSTILE = "all_<img src=x onerror=\"document.title='pwned'\">.sh"
ROWS = """return Array.from(document.querySelectorAll('#plugins tr')).map(tr =>
  Array.from(tr.children).map(td => td.textContent));"""


def test_page_in_chromium_lists_plugins_follows_changes_and_escapes(
        browser: Browser, plugin_dir: Path, launchers: list[PluginLauncher],
        tmp_path: Path) -> None:
    pytest.importorskip("sdnotify")
    write_plugin(plugin_dir, "all_ticker.sh", "#!/bin/bash\nwhile true; do echo \"tick $((i++))\""
                 "; sleep 0.2; done\n")
    write_plugin(plugin_dir, "all_exporter.py", (
        "import sdnotify, time\n"
        "n = sdnotify.SystemdNotifier()\n"
        "n.notify('STATUS=serving on :9400\\nREADY=1')\n"
        "print('listening on :9400', flush=True)\n"
        "while True:\n    time.sleep(1)\n"))
    write_plugin(plugin_dir, HOSTILE, "#!/bin/bash\necho '<b>bold</b> & <i>x</i>'\nexec sleep 60\n")
    write_plugin(plugin_dir, "all_crasher.sh", "#!/bin/bash\necho 'cannot connect'; exit 3\n")
    config = {"plugin_locations": [str(plugin_dir)], "plugin_options": {
        "default": {"stop_timeout": 1},
        "all_exporter.py": {"ready": "notify", "ready_timeout": 20},
        "all_crasher.sh": {"restart": "on-failure", "max_restarts": 2,
                           "backoff": {"initial": 0.05, "max": 0.05}}}}
    launcher = start(PluginLauncher(config, "worker", output_batch=0), launchers)
    server = serve_status(launcher.status_snapshot, "127.0.0.1", 0)
    try:
        port = server.server_address[1]
        browser.get(f"http://127.0.0.1:{port}/")

        def rows() -> dict[str, list[str]]:
            return {row[0]: row for row in browser.run(ROWS)}

        seen = wait_for(lambda: (r := rows()) and len(r) == 4
                        and r["all_ticker.sh"][1] == "running"
                        and r["all_exporter.py"][2] == "yes"
                        and r["all_crasher.sh"][1] == "failed"
                        and r[HOSTILE][7] and r, 20, interval=0.1,
                        message="the page to list the plugins")
        assert seen["all_exporter.py"][6] == "serving on :9400"  # its STATUS= text
        assert "listening on :9400" in seen["all_exporter.py"][7]  # its last lines
        assert seen["all_crasher.sh"][3] == "2"  # restarts
        assert seen[HOSTILE][7] == "<b>bold</b> & <i>x</i>"  # shown as text
        assert browser.run("return document.title") == "plugin-launcher status"
        assert browser.run("return document.querySelectorAll('img, b, i').length") == 0
        health = browser.run("return document.getElementById('health').textContent")
        assert health.startswith("plugin all_crasher.sh failed")
        marker = browser.run("window.sameDocument = 42; return window.sameDocument")

        launcher.stop_plugin("all_ticker.sh")  # a state change, seen without a reload
        wait_for(lambda: rows()["all_ticker.sh"][1] == "stopped", 10, interval=0.1,
                 message="the page to show the plugin stopped")
        assert browser.run("return window.sameDocument") == marker
        browser.screenshot(tmp_path / "page.png")
        assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if SCREENSHOT:
            launcher.start_plugin("all_ticker.sh")
            time.sleep(1.5)  # (documentation only) let a few ticks and a refresh show
            browser.screenshot(Path(SCREENSHOT))
    finally:
        server.shutdown()
        server.server_close()
