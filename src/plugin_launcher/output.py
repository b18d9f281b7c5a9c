"""Turning plugin output into whole, prefixed lines.

The splitter works on whole chunks with bytes operations (one ``rfind`` per chunk, not a loop per
line), keeps at most ``limit`` bytes of an unfinished line, and decodes nothing: decoding with
``errors="replace"`` happens only in the sink, so no byte can ever stop the pump.
"""

from __future__ import annotations

import logging
import os
import select
from typing import Protocol

LINE_LIMIT = 64 * 1024
OUTPUT_LOGGER = logging.getLogger("plugin_launcher")


def display_name(name: str) -> str:
    """A plugin name safe to print: bytes of a non-UTF-8 file name become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


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
    def write(self, name: str, stream: str, block: bytes) -> None:
        """Emit ``block``: one or more whole lines, each ending with a newline."""


class LoggingSink:
    """One log record per line on the ``plugin_launcher`` logger, as LMCache does."""

    def __init__(self, logger: logging.Logger = OUTPUT_LOGGER, level: int = logging.INFO) -> None:
        self.logger = logger
        self.level = level

    def write(self, name: str, stream: str, block: bytes) -> None:
        if not self.logger.isEnabledFor(self.level):
            return
        extra = {"plugin": name, "stream": stream}
        shown = display_name(name)
        for line in block.decode("utf-8", "replace").split("\n")[:-1]:
            self.logger.log(self.level, "[%s] %s", shown, line, extra=extra)


class StreamSink:
    """Prefixed lines straight to a file descriptor, one write per block (the CLI's stdout)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._prefixes: dict[str, tuple[bytes, bytes]] = {}

    def write(self, name: str, stream: str, block: bytes) -> None:
        prefix = self._prefixes.get(name)
        if prefix is None:
            head = f"[{display_name(name)}] ".encode()
            prefix = self._prefixes[name] = (head, b"\n" + head)
        if not block.isascii():  # ASCII is valid UTF-8: skip the round trip on the hot path
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
