"""Turning plugin output into whole, prefixed lines.

The splitter works on whole chunks with bytes operations (one ``rfind`` per chunk, not a loop per
line), keeps at most ``limit`` bytes of an unfinished line, and decodes nothing: decoding with
``errors="replace"`` happens only in the sink, so no byte can ever stop the pump.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import select
import socket
import stat
import time
from typing import Protocol

LINE_LIMIT = 64 * 1024
OUTPUT_LOGGER = logging.getLogger("plugin_launcher")


def display_name(name: str) -> str:
    """A plugin name safe to print: bytes of a non-UTF-8 file name become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# C0 controls except TAB, DEL, C1 controls, the Unicode line and paragraph separators: what could
# move a terminal's cursor, change its title, or start a new (forged) line in a log.
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED_ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def safe_text(text: str) -> str:
    """Untrusted text (a file name, a plugin's line) as one line that is safe on a terminal and
    in a log: control characters become escapes such as ``\\x1b`` and ``\\n``."""
    return _UNSAFE.sub(_escape, text)


def safe_name(name: str) -> str:
    """A plugin name as we print it: ``display_name`` with its control characters escaped."""
    return safe_text(display_name(name))


class SafeArgs(logging.Filter):
    """Escapes a record's text arguments (plugin names, paths, errors), so each of our own log
    messages stays one line and a file name cannot reach a terminal as escape sequences."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                safe_text(str(arg)) if isinstance(arg, (str, BaseException)) else arg
                for arg in record.args)
        return True


def safe_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` with ``SafeArgs`` on it (once)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, SafeArgs) for f in logger.filters):
        logger.addFilter(SafeArgs())
    return logger


def safe_block(block: bytes) -> bytes:
    """Whole lines (each ending with a newline) with every line made ``safe_text``."""
    lines = block.decode("utf-8", "replace").split("\n")
    return "\n".join(safe_text(line) for line in lines).encode("utf-8")


def utc_stamp(now: float | None = None) -> str:
    """ISO-8601 UTC with milliseconds (``2025-01-31T12:00:00.123Z``), as log shippers parse it."""
    now = time.time() if now is None else now
    seconds = int(now)
    millis = int((now - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class LineSplitter:
    """Bytes in, blocks of whole lines out (each block ends with a newline)."""

    __slots__ = ("_partial", "_limit")

    def __init__(self, limit: int = LINE_LIMIT) -> None:
        self._partial = b""
        self._limit = limit

    def feed(self, chunk: bytes) -> bytes:
        data = self._partial + chunk if self._partial else chunk
        end = data.rfind(b"\n") + 1
        block, rest = data[:end], data[end:]
        if len(rest) >= self._limit:  # an over-long line is passed on in pieces
            cut = len(rest) - len(rest) % self._limit
            pieces = rest[:cut]
            block += b"\n".join(
                pieces[i : i + self._limit] for i in range(0, cut, self._limit)
            ) + b"\n"
            rest = rest[cut:]
        self._partial = rest
        return block

    def flush(self) -> bytes:
        """At end of stream: the last line even without its newline."""
        rest, self._partial = self._partial, b""
        return rest + b"\n" if rest else b""


class Sink(Protocol):
    def write(self, name: str, stream: str, block: bytes, pid: int | None = None) -> None:
        """Emit ``block``: one or more whole lines, each ending with a newline, written by
        process ``pid`` (a sink written for the older three-argument form is still accepted:
        the supervisor adapts it, see ``supervisor.adapt_sink``)."""


class LoggingSink:
    """One log record per line on the ``plugin_launcher`` logger, as LMCache does."""

    def __init__(self, logger: logging.Logger = OUTPUT_LOGGER, level: int = logging.INFO) -> None:
        self.logger = logger
        self.level = level

    def write(self, name: str, stream: str, block: bytes, pid: int | None = None) -> None:
        logger = self.logger
        if not logger.hasHandlers():
            # The host configured no logging at all (an LMCache/vLLM process configures only its
            # own loggers): logging would drop INFO lines, so they go to stderr instead.
            logger = _fallback_logger()
        elif not logger.isEnabledFor(self.level):
            return
        extra = {"plugin": name, "stream": stream, "pid": pid}
        shown = safe_name(name)
        # Records are made here and handed to the logger directly, as Logger.log would, minus
        # its search of the stack for the caller (the caller is always this function).  With
        # the standard record factory, one record is made per block and each line's record is
        # a copy of it with its own text (the lines of a block were read together: one time):
        # a third of the cost of building each record anew, which is most of the host tax.
        lines = block.decode("utf-8", "replace").split("\n")[:-1]
        template = logger.makeRecord(logger.name, self.level, __file__, 0, "[%s] %s",
                                     (shown, ""), None, "write", extra)
        handle = logger.handle
        if logging.getLogRecordFactory() is not logging.LogRecord or type(template) is not \
                logging.LogRecord:  # a host's own factory sees every record it makes
            for line in lines:
                handle(logger.makeRecord(logger.name, self.level, __file__, 0, "[%s] %s",
                                         (shown, safe_text(line)), None, "write", extra))
            return
        fields, new, record_type = template.__dict__, object.__new__, logging.LogRecord
        for line in lines:
            record = new(record_type)
            record.__dict__ = {**fields, "args": (shown, safe_text(line))}
            handle(record)


_FALLBACK: list[logging.Logger] = []


def _fallback_logger() -> logging.Logger:
    """A private logger writing ``<time> <logger name> INFO [plugin] line`` to stderr."""
    if not _FALLBACK:
        logger = logging.getLogger("plugin_launcher.unconfigured")
        handler = logging.StreamHandler()  # sys.stderr at the time of each write
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        _FALLBACK.append(logger)
    return _FALLBACK[0]


SINK_BUFFER = 1 << 20  # bytes a sink holds for a slow reader before plugin reading pauses
FINISH_STALL = 1.0  # at exit, pending lines wait at most this long for a reader that reads none


def nonblocking_writer(fd: int) -> tuple[int, bool, bool]:
    """``(fd to write, blocking, own)`` for writing to ``fd`` without ever blocking the loop.

    A regular file is written as is (a local write does not wait for anybody).  Anything else
    (pipe, FIFO, terminal) is reopened through ``/proc/self/fd`` as a new, non-blocking open file
    description of the same object: setting O_NONBLOCK on ``fd`` itself would also change it for
    every process sharing it (a wrapped command writing to the same terminal would get EAGAIN).
    A socket cannot be reopened: it is written with ``MSG_DONTWAIT`` (``own`` False, blocking
    False).
    """
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return fd, True, False
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode) or stat.S_ISCHR(mode) and not os.isatty(fd):
        return fd, True, False  # files, /dev/null: never wait for a reader
    if stat.S_ISSOCK(mode):
        return fd, False, False
    try:
        flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
            flags |= os.O_APPEND
        return os.open(f"/proc/self/fd/{fd}", flags), False, True
    except OSError:
        return fd, True, False  # no /proc: the old blocking behaviour


class NonBlockingOutput:
    """Bytes to a file descriptor without ever blocking the caller: what the reader does not
    take now waits in a pending buffer, which ``flush()`` (when ``fileno()`` is writable) and
    ``finish()`` (at exit) deliver.  ``full()`` tells the caller to stop producing."""

    def __init__(self, fd: int, limit: int = SINK_BUFFER) -> None:
        self.fd = fd
        self.limit = limit
        self._pending = bytearray()
        self._broken = False
        try:
            self._terminal = os.isatty(fd)  # lines to a terminal are escaped (see safe_text)
        except OSError:
            self._terminal = False
        self._out, self._blocking, self._own = nonblocking_writer(fd)
        self._socket = not self._blocking and not self._own

    def _emit(self, parts: list[bytes]) -> None:
        """Write ``parts`` now if nothing is pending, else queue them behind what is."""
        if self._broken:
            return  # the reader went away; keep draining the plugins regardless
        if self._pending:
            for part in parts:
                self._pending += part
            return
        total = sum(len(p) for p in parts)
        written = self._send(parts)
        if written < total:
            data = b"".join(parts)
            if self._blocking:  # a regular file: finish it plainly
                self._write_all(memoryview(data)[written:])
            else:
                self._pending += memoryview(data)[written:]

    def _send(self, parts: list[bytes]) -> int:
        """Bytes of ``parts`` written now (0 if the reader is full); never waits for a reader."""
        try:
            if self._socket:
                return socket_send(self._out, b"".join(parts) if len(parts) > 1 else parts[0])
            return os.writev(self._out, parts)
        except (BlockingIOError, InterruptedError):
            return 0
        except (BrokenPipeError, ConnectionResetError):  # the reader is gone for good
            self._broken = True
            self._pending.clear()
            return sum(len(p) for p in parts)
        except OSError:  # ENOSPC and the like: this block is lost, the next may go through
            return sum(len(p) for p in parts)

    # ------------------------------------------------- flow control (see Supervisor._flow)
    def put(self, data: bytes) -> None:
        """Write ``data`` now, or queue it behind what is pending (see ``full()``)."""
        self._emit([data])

    def fileno(self) -> int:
        """The descriptor to wait on for writability while lines are pending."""
        return self._out

    def pending(self) -> int:
        return len(self._pending)

    def full(self) -> bool:
        return len(self._pending) >= self.limit

    def flush(self) -> None:
        """Write as much of the pending buffer as the reader takes now, without waiting."""
        while self._pending and not self._broken:
            written = self._send([bytes(self._pending[:1 << 20])])
            if not written:
                return
            del self._pending[:written]

    def finish(self, stall: float = FINISH_STALL) -> int:
        """At exit: deliver what is pending as long as the reader keeps taking some within
        ``stall`` seconds; returns the bytes given up on (a dead or stalled reader)."""
        while self._pending and not self._broken:
            before = len(self._pending)
            self.flush()
            if self._pending and len(self._pending) == before:
                _, ready, _ = select.select([], [self._out], [], stall)
                if not ready:
                    break
        left = len(self._pending)
        self._pending.clear()
        return left

    def close(self) -> None:
        """Release the private non-blocking descriptor (the caller's ``fd`` stays open)."""
        if self._own:
            self._own = False
            try:
                os.close(self._out)
            except OSError:
                pass
            self._out, self._blocking, self._socket = self.fd, True, False

    def _write_all(self, view: memoryview) -> None:
        while view:
            try:
                written = os.write(self._out, view)
            except BlockingIOError:
                select.select([], [self._out], [])
                continue
            except OSError:
                return
            view = view[written:]


class StreamSink(NonBlockingOutput):
    """Prefixed lines to a file descriptor (the CLI's stdout), never blocking the caller.

    Lines go out at once while the reader keeps up; otherwise they wait in a pending buffer and
    the supervisor, seeing ``full()``, stops reading plugin pipes (the pipes slow the plugins;
    nothing is dropped) and calls ``flush()`` when ``fileno()`` is writable again.
    """

    def __init__(self, fd: int, *, timestamps: bool = False, limit: int = SINK_BUFFER) -> None:
        super().__init__(fd, limit)
        self.timestamps = timestamps
        self._prefixes: dict[str, tuple[bytes, bytes]] = {}

    def write(self, name: str, stream: str, block: bytes, pid: int | None = None) -> None:
        prefix = self._prefixes.get(name)
        if self.timestamps:  # one time per block: the lines of a block were read together
            head = f"{utc_stamp()} [{safe_name(name)}] ".encode()
            prefix = (head, b"\n" + head)
        elif prefix is None:
            head = f"[{safe_name(name)}] ".encode()
            prefix = self._prefixes[name] = (head, b"\n" + head)
        if self._terminal:  # never a plugin's escape sequence raw on a terminal
            block = safe_block(block)
        elif not block.isascii():  # ASCII is valid UTF-8: skip the round trip on the hot path
            block = block.decode("utf-8", "replace").encode("utf-8")
        # One gathered write per block: no concatenated copy of the whole block.
        self._emit([prefix[0], block[:-1].replace(b"\n", prefix[1]), b"\n"])


def socket_send(fd: int, data: bytes) -> int:
    """``send(fd, data, MSG_DONTWAIT)`` on a socket we only have as a descriptor."""
    sock = socket.socket(fileno=fd)
    try:
        return sock.send(data, socket.MSG_DONTWAIT)
    finally:
        sock.detach()
