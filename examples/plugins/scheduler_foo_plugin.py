#!/usr/bin/env python3
"""A minimal scheduler plugin that uses only the standard library.

It runs under any Python 3 (so also under LMCache's own plugin launcher, where plugin-launcher's
kit may not be installed): it reads and checks its environment and configuration, says it started,
prints a line every ``extra_config.foo_interval`` seconds (default 1.0), and on SIGTERM or SIGINT
says it is stopping and exits 0. With the kit installed, ``plugin_launcher.plugin`` does all of
this in three lines; see ``all_heartbeat.py``.
"""

import json
import os
import signal
import sys
import time
from typing import NoReturn

NAME = "scheduler_foo_plugin"


class Stop(Exception):
    """Raised by the signal handler so that the loop ends at once, even in the middle of a sleep."""


def fail(message: str) -> NoReturn:
    """Explain a bad setting in one line and exit with a status that says "configuration error"."""
    print(f"{NAME}: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def env_int(name: str, minimum: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        fail(f"{name}: not set")
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        fail(f"{name}: expected an integer >= {minimum}, got {raw!r}")
    return value


def main() -> int:
    role = os.environ.get("LMCACHE_PLUGIN_ROLE", "").upper()
    if not role:
        fail("LMCACHE_PLUGIN_ROLE: not set")
    worker_id = env_int("LMCACHE_PLUGIN_WORKER_ID", -1)
    worker_count = env_int("LMCACHE_PLUGIN_WORKER_COUNT", 1)
    try:
        config = json.loads(os.environ.get("LMCACHE_PLUGIN_CONFIG", ""))
    except ValueError:
        fail("LMCACHE_PLUGIN_CONFIG: not set or not valid JSON")
    extra = config.get("extra_config") if isinstance(config, dict) else None
    if not isinstance(extra, dict):
        extra = {}
    interval = extra.get("foo_interval", 1.0)
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0:
        fail(f"extra_config.foo_interval: expected a number > 0, got {interval!r}")

    def on_signal(signum: int, _frame: object) -> None:
        raise Stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(
        f"{NAME} started: role={role} worker_id={worker_id} worker_count={worker_count}",
        flush=True,
    )
    ticks = 0
    try:
        while True:
            time.sleep(interval)
            ticks += 1
            print(f"{NAME} tick {ticks}", flush=True)
    except Stop:
        print(f"{NAME} stopping", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
