"""The host's end of the guardian (see ``guardian.py`` for why it exists)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

from . import guardian

log = logging.getLogger(__name__)


class GuardianClient:
    """Starts the guardian and tells it which process groups to end if this process dies."""

    def __init__(self) -> None:
        self._popen: subprocess.Popen[bytes] | None = None
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._broken = False
        self._pending: list[str] = []

    def start(self) -> None:
        read_end, write_end = os.pipe()  # both close-on-exec: no plugin can hold the pipe open
        try:
            self._popen = subprocess.Popen(
                [sys.executable or "python3", "-I", "-S", guardian.__file__, str(os.getpid())],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            os.close(write_end)
            self._broken = True
            log.error("cannot start the guardian process (%s): plugins will not be stopped if "
                      "this process is killed", exc)
            return
        finally:
            os.close(read_end)
        self._fd = write_end

    def _send(self, message: str) -> None:
        with self._lock:
            self._pending.append(message)

    def flush(self) -> None:
        """Send what was queued in one write (the supervisor flushes after each loop round)."""
        with self._lock:
            if not self._pending or self._fd is None:
                return
            message, self._pending = "".join(self._pending), []
            try:
                os.write(self._fd, message.encode())
            except OSError as exc:
                if not self._broken:
                    log.error("guardian process is gone (%s): plugins will not be stopped if "
                              "this process is killed", exc)
                self._broken = True

    def watch(self, pgid: int, stop_timeout: float) -> None:
        self._send(f"+ {pgid} {stop_timeout}\n")

    def forget(self, pgid: int) -> None:
        self._send(f"- {pgid}\n")

    def close(self) -> None:
        """Let the guardian go: it ends whatever groups it still knows, then exits."""
        self.flush()
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        if self._popen is not None:
            try:
                self._popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            self._popen = None
