"""Health check and service registration: POST a JSON heartbeat to a URL at a steady pace.

Every ``extra_config.heartbeat_interval`` seconds (default 10) each process (scheduler and every
worker) sends ``{"event": "alive", "role", "worker_id", "worker_count", "pid", "host", "time",
"parent_alive", "plugin"}`` to ``extra_config.heartbeat_url``, where ``pid`` is the PID of the
served process. A registry can list the live instances and drop the ones whose beats stop. Each
request gives up after ``heartbeat_timeout`` seconds (default 5); while the endpoint is down, the
beats back off, doubling the wait up to ``heartbeat_max_backoff`` seconds (default 60), with one
log line per failure. On SIGTERM a last ``"event": "leaving"`` beat deregisters the instance.

No shebang: the launcher runs it with its own Python, which has plugin_launcher.plugin.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request

from plugin_launcher.plugin import PluginContext, run


def main(ctx: PluginContext) -> int:
    url = ctx.option("heartbeat_url", str)
    if url is None:
        ctx.log("set extra_config.heartbeat_url to send heartbeats; exiting")
        return 0
    if not url.startswith(("http://", "https://")):
        ctx.log(f"extra_config.heartbeat_url: expected an http(s) URL, got {url!r}", error=True)
        return 2
    interval = ctx.option("heartbeat_interval", float, 10.0, minimum=0.01)
    timeout = ctx.option("heartbeat_timeout", float, 5.0, minimum=0.01)
    max_backoff = ctx.option("heartbeat_max_backoff", float, max(60.0, interval), minimum=interval)
    host = socket.gethostname()

    def beat(event: str, timeout: float = timeout) -> None:
        body = {
            "event": event,
            "role": ctx.role,
            "worker_id": ctx.worker_id,
            "worker_count": ctx.worker_count,
            "pid": ctx.parent_pid,
            "host": host,
            "time": time.time(),
            "parent_alive": ctx.parent_alive(),
            "plugin": ctx.name,
        }
        request = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()

    def heartbeat() -> None:
        beat("alive")

    ctx.log(f"sending heartbeats to {url} every {interval:g} s")
    # The extra second lets urlopen's own timeout fire first, with the clearer message.
    ctx.every(interval, heartbeat, timeout=timeout + 1, max_backoff=max_backoff)
    try:  # quickly: the launcher kills a plugin that takes more than a few seconds to stop
        beat("leaving", timeout=min(timeout, 2.0))
    except OSError as exc:
        ctx.log(f"last heartbeat to {url} failed: {exc}", error=True)
    return 0


if __name__ == "__main__":
    run(main)
