"""Log formats and per-plugin log storage: JSON lines, rotated per-plugin files, the tail buffer.

Everything here runs on the supervisor's loop (or in a ``logging`` handler), so nothing blocks
beyond a plain write to a local file, and no failure is raised into the loop: a file that cannot
be opened or renamed becomes one error line and the plugin runs on.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from collections import deque
from typing import Any

from .output import NonBlockingOutput, StreamSink, display_name, utc_stamp

log = logging.getLogger("plugin_launcher.logs")
_encode = json.encoder.encode_basestring
RING_LINES = 1000
RING_BYTES = 256 * 1024
RETRY_OPEN = 5.0  # seconds between attempts to reopen a log file that failed
LOG_BUFFER = 256 * 1024  # bytes of our own messages held for a stderr reader that lags
LAST_LINES = 3  # a plugin's newest lines in its status (``last_lines``; the status page)


class JsonSink(StreamSink):
    """One JSON object per plugin line (``time``, ``plugin``, ``stream``, ``pid``, ``line``):
    what Vector, Fluent Bit or Promtail read without a parser of their own."""

    def write(self, name: str, stream: str, block: bytes, pid: int | None = None) -> None:
        head = (f'{{"time": "{utc_stamp()}", "plugin": {_encode(display_name(name))}, '
                f'"stream": "{stream}", "pid": {"null" if pid is None else int(pid)}, "line": ')
        lines = block.decode("utf-8", "replace").split("\n")[:-1]
        self._emit(["".join([f"{head}{_encode(line)}}}\n" for line in lines]).encode("utf-8")])


class NonBlockingLogHandler(logging.Handler):
    """The CLI's own messages to stderr, never blocking the thread that logs (the supervisor's
    loop included): with ``run 2>&1 | reader`` and a reader that stops reading, a plain
    ``StreamHandler`` would block the loop in ``write()`` and no signal would be served.

    What the reader does not take waits (``LOG_BUFFER`` bytes); past that, messages are
    dropped and counted, and one line says how many once the reader takes data again.  The
    CLI's own loop calls ``flush()`` while something is pending and ``finish()`` at exit."""

    def __init__(self, fd: int, limit: int = LOG_BUFFER) -> None:
        super().__init__()
        self.out = NonBlockingOutput(fd, limit)
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:  # undecodable bytes in a name as ``\udcff``, as Python's own stderr shows them
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
        except Exception:  # noqa: BLE001 - logging's own convention
            self.handleError(record)
            return
        self._flush_locked()
        if self.out.pending() + len(data) > self.out.limit:
            self.dropped += 1
            return
        self.out.put(data)

    def _flush_locked(self) -> None:
        self.out.flush()
        if self.dropped and not self.out.pending():
            note = logging.makeLogRecord({
                "name": "plugin_launcher", "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": "%d messages of plugin-launcher were dropped: stderr was not read",
                "args": (self.dropped,)})
            self.dropped = 0
            self.out.put((self.format(note) + "\n").encode("utf-8", "backslashreplace"))

    def pending(self) -> int:
        return self.out.pending()

    def flush(self) -> None:
        self.acquire()
        try:
            self._flush_locked()
        finally:
            self.release()

    def finish(self, stall: float) -> None:
        """At exit: deliver what is pending while the reader takes some within ``stall``."""
        self.acquire()
        try:
            self._flush_locked()
            self.out.finish(stall)
        finally:
            self.release()

    def close(self) -> None:
        self.acquire()
        try:
            self.out.close()
        finally:
            self.release()
        super().close()


class JsonFormatter(logging.Formatter):
    """The launcher's own messages as JSON lines (``time``, ``level``, ``logger``, ``message``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": utc_stamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def log_path(template: str, name: str, role: str, worker_id: int | None) -> str:
    """``log_file`` with ``{name}``, ``{role}`` (lower case) and ``{worker_id}`` filled in."""
    worker = "-1" if worker_id is None else str(worker_id)
    return template.format(name=name, role=role.lower(), worker_id=worker)


class RotatingLog:
    """An append-only log file rotated like ``RotatingFileHandler`` (x -> x.1 -> x.2 ...), at
    whole-line boundaries only, so every file starts and ends on a line.  ``max_bytes`` 0 never
    rotates; ``backups`` 0 starts the file anew when it is full."""

    def __init__(self, path: str, max_bytes: int, backups: int,
                 clock: Any = time.monotonic) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.clock = clock
        self.fd: int | None = None
        self.size = 0
        self.failed_at: float | None = None  # monotonic time of the last failure, if failing
        self.lost = 0  # lines not written while failing

    def write(self, block: bytes) -> None:
        if self.fd is None and not self._open():
            self.lost += block.count(b"\n")
            return
        if not self.max_bytes:
            self._write(block)
            return
        while block:
            room = self.max_bytes - self.size
            if len(block) <= room:
                self._write(block)
                return
            cut = block.rfind(b"\n", 0, room) + 1 if room > 0 else 0
            if cut == 0 and self.size == 0:  # one line longer than a whole file: it alone
                cut = block.index(b"\n") + 1
            if cut:
                self._write(block[:cut])
                block = block[cut:]
            if not self._rotate():
                self.lost += block.count(b"\n")
                return

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    # ----------------------------------------------------------------------------- internals
    def _fail(self, what: str, exc: OSError) -> None:
        self.close()
        if self.failed_at is None:
            log.error("log file %s: cannot %s: %s; its lines go to the main log only until "
                      "it works again", self.path, what, exc.strerror or exc)
        self.failed_at = self.clock()

    def _open(self) -> bool:
        if self.failed_at is not None and self.clock() - self.failed_at < RETRY_OPEN:
            return False
        try:
            parent = os.path.dirname(self.path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            # O_NONBLOCK: a FIFO without a reader fails here (ENXIO) instead of hanging the loop
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                              | os.O_NONBLOCK, 0o644)
            info = os.fstat(self.fd)
            if not stat.S_ISREG(info.st_mode):  # a FIFO or device could block every write
                raise OSError(errno.EINVAL, "not a regular file")
            self.size = info.st_size
        except OSError as exc:
            self._fail("open it", exc)
            return False
        if self.failed_at is not None:
            log.warning("log file %s works again (%d lines were not written to it)",
                        self.path, self.lost)
            self.failed_at = None
            self.lost = 0
        return True

    def _write(self, data: bytes) -> None:
        assert self.fd is not None
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                self.lost += bytes(view).count(b"\n")
                self._fail("write to it", exc)
                return
            self.size += written
            view = view[written:]

    def _rotate(self) -> bool:
        """Shift x.N-1 -> x.N ... x -> x.1 and open a fresh x; False if that failed."""
        self.close()
        try:
            if self.backups:
                for i in range(self.backups - 1, 0, -1):
                    source = f"{self.path}.{i}"
                    if os.path.lexists(source):
                        os.replace(source, f"{self.path}.{i + 1}")
                os.replace(self.path, f"{self.path}.1")
            else:
                os.truncate(self.path, 0)
        except FileNotFoundError:
            pass  # someone removed the file: start a new one
        except OSError as exc:
            self._fail("rotate it", exc)
            return False
        return self._open()


class RingBuffer:
    """The last lines of one plugin (at most ``lines`` lines and about ``size`` bytes), kept as
    the blocks the supervisor already has: one append per block on the hot path."""

    __slots__ = ("blocks", "lines", "size", "max_lines", "max_size")

    def __init__(self, max_lines: int = RING_LINES, max_size: int = RING_BYTES) -> None:
        self.blocks: deque[tuple[bytes, int]] = deque()
        self.lines = 0
        self.size = 0
        self.max_lines = max_lines
        self.max_size = max_size

    def add(self, block: bytes, count: int) -> None:
        self.blocks.append((block, count))
        self.lines += count
        self.size += len(block)
        while len(self.blocks) > 1:  # drop old blocks the newest ones make unnecessary
            first, first_count = self.blocks[0]
            if self.lines - first_count < self.max_lines and self.size - len(first) < self.max_size:
                break
            self.blocks.popleft()
            self.lines -= first_count
            self.size -= len(first)

    def last(self, n: int) -> list[bytes]:
        """The newest ``n`` lines (at most ``max_lines``, at most ``max_size`` bytes)."""
        n = max(0, min(n, self.max_lines))
        if not n:
            return []
        found: list[bytes] = []
        size = 0
        for block, _count in reversed(self.blocks):
            for line in reversed(block[:-1].split(b"\n")):
                size += len(line) + 1
                if len(found) >= n or size > self.max_size:
                    return found[::-1]
                found.append(line)
        return found[::-1]
