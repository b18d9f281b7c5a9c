"""Shared helpers for tests that start real processes: poll with deadlines, check PIDs, clean up."""

from __future__ import annotations

import logging
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PYTHON = sys.executable
CLI = [PYTHON, "-m", "plugin_launcher"]


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (a zombie has already died)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    wait_for(lambda: not [p for p in pids if alive(p)], timeout,
             message=f"processes {[p for p in pids if alive(p)]} to end")


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid``, started by any of its threads (from /proc)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
        except OSError:
            continue
        found.extend(int(x) for x in text.split())
    return found


def write_plugin(folder: Path, name: str, text: str, mode: int = 0o755) -> Path:
    """Create a plugin file (folders included) with a safe mode (not group/other writable)."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def read_pids(path: Path) -> list[int]:
    """PIDs a plugin wrote to a file, one per line (how tests learn about grandchildren)."""
    try:
        return [int(x) for x in path.read_text().split()]
    except (OSError, ValueError):
        return []


class ProcessTracker:
    """Remembers every PID a test learns about and kills the leftovers at teardown."""

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self.popens: list[subprocess.Popen[Any]] = []

    def add(self, *pids: int) -> None:
        self.pids.update(pids)

    def popen(self, *args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(*args, **kwargs)
        self.popens.append(proc)
        self.pids.add(proc.pid)
        return proc

    def cleanup(self) -> list[int]:
        leftovers = [pid for pid in self.pids if alive(pid)]
        for pid in leftovers:
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for proc in self.popens:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            for pipe in (proc.stdout, proc.stderr, proc.stdin):
                if pipe is not None:
                    pipe.close()
        return leftovers


def safe_dir(path: Path) -> Path:
    """Make ``path`` pass the permission check (owned by us, not group/other writable)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    return path


class LogRecorder(logging.Handler):
    """Every message of the ``plugin_launcher`` loggers (plugin output and the launcher's own)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._guard:
            self.messages.append(record.getMessage())

    def lines(self) -> list[str]:
        with self._guard:
            return list(self.messages)

    def having(self, *parts: str) -> list[str]:
        return [m for m in self.lines() if all(p in m for p in parts)]

    def count(self, message: str) -> int:
        return sum(1 for m in self.lines() if m == message)

    def output(self, name: str) -> list[str]:
        prefix = f"[{name}] "
        return [m[len(prefix):] for m in self.lines() if m.startswith(prefix)]

    def started_pids(self, name: str) -> list[int]:
        """PIDs from the supervisor's "started plugin NAME (pid N)" lines, in order."""
        pattern = re.compile(rf"^started plugin {re.escape(name)} \(pid (\d+)\)")
        return [int(m.group(1)) for m in map(pattern.match, self.lines()) if m]


# Plugins that record "<own pid> <grandchild pid>" to $PID_DIR/<name>.pids, then keep running.
BASH_WITH_GRANDCHILD = """\
#!/bin/bash
sleep 1000 &
echo "$$ $!" > "$PID_DIR/$LMCACHE_PLUGIN_NAME.tmp"
mv "$PID_DIR/$LMCACHE_PLUGIN_NAME.tmp" "$PID_DIR/$LMCACHE_PLUGIN_NAME.pids"
wait
"""

# A Python plugin that ignores SIGTERM, and so does its grandchild (SIG_IGN survives exec).
PYTHON_IGNORES_TERM = """\
import os, signal, subprocess, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen(["sleep", "1000"])
path = os.path.join(os.environ["PID_DIR"], os.environ["LMCACHE_PLUGIN_NAME"])
with open(path + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {child.pid}\\n")
os.rename(path + ".tmp", path + ".pids")
while True:
    time.sleep(1)
"""


def status_of(launcher: Any, name: str) -> dict[str, Any] | None:
    """The ``status()`` entry of plugin ``name``, or None."""
    return next((e for e in launcher.status() if e["name"] == name), None)


def running_pid(launcher: Any, name: str) -> int | None:
    """The PID of plugin ``name`` if it is running (and alive), else None."""
    entry = status_of(launcher, name)
    if entry is not None and entry["state"] == "running" and entry["pid"] and alive(entry["pid"]):
        return int(entry["pid"])
    return None


def start(launcher: Any, launchers: list[Any]) -> Any:
    """Launch, registering the launcher for teardown first (see the ``launchers`` fixture)."""
    launchers.append(launcher)
    launcher.launch_plugins()
    return launcher


def wait_running(launcher: Any, name: str, tracker: ProcessTracker, timeout: float = 10.0) -> int:
    """Wait until plugin ``name`` runs; record its PID for cleanup; return it."""
    pid = wait_for(lambda: running_pid(launcher, name), timeout, message=f"{name} to run")
    tracker.add(pid)
    return int(pid)
