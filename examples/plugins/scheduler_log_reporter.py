"""Log reporter: follow a log file and forward each new line to a syslog server over UDP.

Follows ``extra_config.log_file`` like ``tail -F``: it starts at the end of the file, waits for it
if it does not exist yet, and keeps up when the file is rotated (renamed and recreated: the rest of
the old file is read first) or truncated. Each line goes to ``syslog_host``:``syslog_port``
(default 514) through the standard library's ``logging.handlers.SysLogHandler``, tagged
``lmcache-<role>[<pid of the served process>]``, at the level named in the line (INFO otherwise).
The file is checked every ``log_poll_interval`` seconds (default 0.5).

No shebang: the launcher runs it with its own Python, which has plugin_launcher.plugin.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
from collections.abc import Callable
from typing import BinaryIO

from plugin_launcher.plugin import PluginContext, run

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}  # as in logging
LEVEL = re.compile(r"\b(" + "|".join(LEVELS) + r")\b")


class Follower:
    """Reads the lines appended to a path, across rotation and truncation."""

    def __init__(self, path: str, emit: Callable[[str], None]) -> None:
        self.path, self.emit = path, emit
        self.file: BinaryIO | None = None
        self.identity: tuple[int, int] | None = None
        self.partial = self.last = b""  # the line being read, the last bytes read
        self.open(at_end=True)

    def open(self, at_end: bool) -> None:
        try:
            file = open(self.path, "rb")  # stays open between polls, to read it after a rename
        except FileNotFoundError:
            return
        if at_end:
            file.seek(0, os.SEEK_END)
        stat = os.fstat(file.fileno())
        self.file, self.identity = file, (stat.st_dev, stat.st_ino)
        self.partial = self.last = b""

    def poll(self) -> None:
        """Forward what was appended since the last poll; reopen the path if it was rotated."""
        if self.file is None:
            self.open(at_end=False)  # created after we started: all of it is new
        if self.file is None:
            return
        if self.rewritten():
            self.file.seek(0)  # truncated in place (copytruncate), maybe already written again
            self.partial = self.last = b""
        self.forward(self.file.read())
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return  # rotated and not recreated yet: keep the old file until it is
        if (stat.st_dev, stat.st_ino) != self.identity:
            self.forward(self.file.read())  # the last lines written before the switch
            if self.partial:
                self.forward(b"\n")
            self.file.close()
            self.open(at_end=False)
            self.poll()

    def rewritten(self) -> bool:
        """Whether the bytes just before our position changed: the file was truncated."""
        assert self.file is not None
        position = self.file.tell()
        if not self.last:
            return os.fstat(self.file.fileno()).st_size < position
        return os.pread(self.file.fileno(), len(self.last), position - len(self.last)) != self.last

    def forward(self, data: bytes) -> None:
        if data:
            self.last = (self.last + data)[-64:]
        *lines, self.partial = (self.partial + data).split(b"\n")
        for line in lines:
            self.emit(line.decode("utf-8", "replace").rstrip("\r"))

    def close(self) -> None:
        if self.partial:
            self.forward(b"\n")  # a last line without its newline is a line too
        if self.file is not None:
            self.file.close()


def main(ctx: PluginContext) -> int:
    path = ctx.option("log_file", str)
    host = ctx.option("syslog_host", str)
    if path is None or host is None:
        ctx.log("set extra_config.log_file and extra_config.syslog_host to forward a log; exiting")
        return 0
    port = ctx.option("syslog_port", int, 514, minimum=1, maximum=65535)
    poll_interval = ctx.option("log_poll_interval", float, 0.5, minimum=0.01)

    handler = logging.handlers.SysLogHandler(address=(host, port))  # UDP
    handler.ident = f"lmcache-{ctx.role.lower()}[{ctx.parent_pid}]: "
    syslog = logging.getLogger("log_reporter")
    syslog.propagate = False
    syslog.addHandler(handler)
    syslog.setLevel(logging.DEBUG)

    def emit(line: str) -> None:
        level = LEVEL.search(line)
        syslog.log(LEVELS[level.group(1)] if level else logging.INFO, line)

    follower = Follower(path, emit)
    ctx.log(f"following {path}, forwarding new lines to syslog at {host}:{port}")
    ctx.every(poll_interval, follower.poll)
    follower.poll()  # what was written just before the stop
    follower.close()
    handler.close()
    return 0


if __name__ == "__main__":
    run(main)
