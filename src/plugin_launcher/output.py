"""Turning plugin output into whole, prefixed lines.

The splitter works on whole chunks with bytes operations (one ``rfind`` per chunk, not a loop per
line), keeps at most ``limit`` bytes of an unfinished line, and decodes nothing: decoding with
``errors="replace"`` happens only in the sink, so no byte can ever stop the pump.
"""

from __future__ import annotations

import logging
import os
import re
import select
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
        for line in block.decode("utf-8", "replace").split("\n")[:-1]:
            logger.log(self.level, "[%s] %s", shown, safe_text(line), extra=extra)


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


class StreamSink:
    """Prefixed lines straight to a file descriptor, one write per block (the CLI's stdout)."""

    def __init__(self, fd: int, *, timestamps: bool = False) -> None:
        self.fd = fd
        self.timestamps = timestamps
        self._prefixes: dict[str, tuple[bytes, bytes]] = {}
        try:
            self._terminal = os.isatty(fd)  # lines to a terminal are escaped (see safe_text)
        except OSError:
            self._terminal = False

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
        parts = [prefix[0], block[:-1].replace(b"\n", prefix[1]), b"\n"]
        total = sum(len(p) for p in parts)
        try:
            written = os.writev(self.fd, parts)
        except BlockingIOError:
            written = 0
        except BrokenPipeError:
            return  # the reader went away; keep draining the plugins regardless
        if written < total:  # a partial write (pipe or non-blocking fd): finish it plainly
            self._write_all(memoryview(b"".join(parts))[written:])

    def _write_all(self, view: memoryview) -> None:
        while view:
            try:
                written = os.write(self.fd, view)
            except BlockingIOError:
                select.select([], [self.fd], [])
                continue
            except BrokenPipeError:
                return
            view = view[written:]
