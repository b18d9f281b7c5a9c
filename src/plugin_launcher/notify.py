"""The sd_notify protocol, so plugins that already speak it (``sdnotify``, ``systemd.daemon``,
``systemd-notify``) work unchanged.

Each launcher owns one ``AF_UNIX`` datagram socket in a private folder (mode 0700), handed to
every plugin as ``NOTIFY_SOCKET``.  The kernel stamps every datagram with the sender's
credentials (``SO_PASSCRED``/``SCM_CREDENTIALS``), which a process cannot forge without
CAP_SYS_ADMIN: a datagram counts for the plugin whose process group or session holds the sender,
so one plugin cannot speak for another, and anything else is dropped with a debug line.
Descriptors passed along (``BARRIER=1``, as ``systemd-notify`` sends) are closed once the
datagram is handled, which is what releases the sender's barrier.

Parsing (``parse_notice``) and attribution (``owner_of``) are pure, table-tested functions; the
socket is read on the supervisor's selector, never in a thread of its own.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import struct
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

log = logging.getLogger("plugin_launcher.notify")
T = TypeVar("T")
ENV_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG = "WATCHDOG_USEC"
MAX_DATAGRAM = 4096  # systemd's limit too (NOTIFY_BUFFER_MAX): a longer one is dropped
MAX_STATUS = 1024  # characters of STATUS= kept (the status page and /status show it)
MAX_FDS = 16  # descriptors one datagram may carry (all are closed at once)
READ_BATCH = 256  # datagrams read per wake-up, so one flooding plugin cannot hold the loop
SUN_PATH_MAX = 107
_UCRED = struct.Struct("3i")  # pid, uid, gid


@dataclass(frozen=True)
class Notice:
    """What one datagram says; fields for keys it does not carry keep their defaults."""

    ready: bool = False  # READY=1
    status: str | None = None  # STATUS=...
    watchdog: bool = False  # WATCHDOG=1: a pet
    watchdog_trigger: bool = False  # WATCHDOG=trigger: "I am hung", as a missed watchdog
    stopping: bool = False  # STOPPING=1
    extend_timeout_usec: int | None = None  # EXTEND_TIMEOUT_USEC=N
    barrier: bool = False  # BARRIER=1 (the passed descriptor is closed after handling)
    ignored: tuple[str, ...] = ()  # keys not understood, or values that are malformed

    @property
    def empty(self) -> bool:
        return self == Notice(barrier=self.barrier, ignored=self.ignored)


def _usec(value: str) -> int | None:
    """A non-negative decimal integer of microseconds (as systemd's safe_atou64), else None."""
    value = value.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 19:
        return None
    return int(value)


def parse_notice(data: bytes) -> Notice:
    """Parse newline-separated ``KEY=VALUE`` assignments the way systemd does: the last of a
    repeated key wins, empty lines are skipped, a line without ``=`` or a key we do not know is
    listed in ``ignored`` (so a debug line can name it), and a datagram with a NUL byte is
    ignored as a whole."""
    if b"\0" in data:
        return Notice(ignored=("<NUL byte: datagram ignored>",))
    values: dict[str, str] = {}
    ignored: list[str] = []
    for raw in data.split(b"\n"):
        if not raw:
            continue
        line = raw.decode("utf-8", "replace")
        key, sep, value = line.partition("=")
        if not sep or not key:
            ignored.append(line[:40])
            continue
        values[key] = value
    ready = values.pop("READY", None)
    status = values.pop("STATUS", None)
    watchdog = values.pop("WATCHDOG", None)
    stopping = values.pop("STOPPING", None)
    extend = values.pop("EXTEND_TIMEOUT_USEC", None)
    barrier = values.pop("BARRIER", None)
    values.pop("MAINPID", None)  # the main process is the one we started: nothing to learn
    values.pop("ERRNO", None)
    extend_usec = _usec(extend) if extend is not None else None
    checks: tuple[tuple[str, str | None, bool], ...] = (
        ("READY", ready, ready in (None, "1")),
        ("WATCHDOG", watchdog, watchdog in (None, "1", "trigger")),
        ("STOPPING", stopping, stopping in (None, "1")),
        ("EXTEND_TIMEOUT_USEC", extend, extend is None or extend_usec is not None),
        ("BARRIER", barrier, barrier in (None, "1")))
    ignored.extend(f"{key}={value!s:.20}" for key, value, ok in checks if not ok)
    ignored.extend(values)
    return Notice(
        ready=ready == "1",
        status=None if status is None else status[:MAX_STATUS],
        watchdog=watchdog == "1",
        watchdog_trigger=watchdog == "trigger",
        stopping=stopping == "1",
        extend_timeout_usec=extend_usec,
        barrier=barrier == "1",
        ignored=tuple(ignored),
    )


def stat_ids(text: str) -> tuple[int, int] | None:
    """(process group, session) from the text of ``/proc/<pid>/stat``; None if malformed.
    The command name may hold spaces and parentheses, so fields are counted after the last
    ``)``: state, ppid, pgrp, session."""
    _, sep, rest = text.rpartition(")")
    fields = rest.split()
    if not sep or len(fields) < 4:
        return None
    try:
        return int(fields[2]), int(fields[3])
    except ValueError:
        return None


def process_ids(pid: int) -> tuple[int, int] | None:
    """(process group, session) of a live ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return stat_ids(f.read())
    except OSError:
        return None


def owner_of(pid: int, leaders: Mapping[int, T],
             ids: Callable[[int], tuple[int, int] | None] = process_ids) -> T | None:
    """The plugin a sender belongs to: the one whose main process it is, or whose process group
    or session it is in (every plugin leads its own session and group).  ``leaders``: main PID
    -> plugin.  A sender elsewhere (even a child that called setsid) belongs to nobody."""
    found = leaders.get(pid)
    if found is not None:
        return found
    pair = ids(pid)
    if pair is None:
        return None
    pgid, sid = pair
    found = leaders.get(pgid)
    return found if found is not None else leaders.get(sid)


@dataclass(frozen=True)
class Datagram:
    data: bytes
    pid: int
    uid: int


def _runtime_folder() -> str:
    """Where the private folder goes: ``$XDG_RUNTIME_DIR`` if usable, else the temp folder
    (whichever keeps the socket path within a Unix socket's 107 bytes)."""
    for base in (os.environ.get("XDG_RUNTIME_DIR", ""), tempfile.gettempdir(), "/tmp"):
        if base and os.path.isabs(base) and os.path.isdir(base) and len(base) < 60:
            return base
    return "/tmp"


@dataclass
class NotifySocket:
    """The launcher's notification socket: ``path`` goes to plugins as ``NOTIFY_SOCKET``."""

    folder: str = ""
    path: str = ""
    sock: socket.socket = field(init=False)

    def __post_init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="plugin-launcher-notify-", dir=_runtime_folder())
        self.path = os.path.join(self.folder, "notify")
        if len(os.fsencode(self.path)) > SUN_PATH_MAX:  # pragma: no cover (checked above)
            os.rmdir(self.folder)
            raise OSError(f"notify socket path too long: {self.path}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock.bind(self.path)
            os.chmod(self.path, 0o600)  # the folder is 0700 already: belt and braces
            sock.setblocking(False)
        except OSError:
            sock.close()
            self._remove_files()
            raise
        self.sock = sock
        self.uid = os.getuid()

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> list[Datagram]:
        """Every datagram waiting (at most READ_BATCH), with its sender.  Descriptors passed
        along are closed here; datagrams that are too long, lack credentials or come from
        another user are dropped with a debug line."""
        found: list[Datagram] = []
        ancillary = socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(MAX_FDS * 4)
        for _ in range(READ_BATCH):
            try:
                data, anc, flags, _addr = self.sock.recvmsg(MAX_DATAGRAM + 1, ancillary)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # never raise into the loop
                log.debug("notify socket: receive failed: %s", exc)
                break
            pid = uid = -1
            for level, kind, payload in anc:
                if level != socket.SOL_SOCKET:
                    continue
                if kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
                    pid, uid, _gid = _UCRED.unpack(payload[:_UCRED.size])
                elif kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                    for fd in fds:
                        _close(fd)
            if len(data) > MAX_DATAGRAM or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                log.debug("notify socket: dropped a datagram from pid %d (too long)", pid)
                continue
            if pid <= 0:
                log.debug("notify socket: dropped a datagram without credentials")
                continue
            if uid not in (self.uid, 0):
                log.debug("notify socket: dropped a datagram from pid %d of uid %d", pid, uid)
                continue
            found.append(Datagram(data, pid, uid))
        return found

    def close(self) -> None:
        self.sock.close()
        self._remove_files()

    def _remove_files(self) -> None:
        for remove, path in ((os.unlink, self.path), (os.rmdir, self.folder)):
            try:
                remove(path)
            except OSError:
                pass


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def plugin_variables(path: str, watchdog: float | None) -> dict[str, str]:
    """The variables a plugin gets: ``NOTIFY_SOCKET``, and ``WATCHDOG_USEC`` when it has a
    watchdog (no ``WATCHDOG_PID``: its PID is not known before it starts, and libsystemd then
    accepts pets from any process of the plugin)."""
    env = {ENV_SOCKET: path}
    if watchdog is not None:
        env[ENV_WATCHDOG] = str(max(1, round(watchdog * 1_000_000)))
    return env


# ------------------------------------------------------------------ one plugin's notify state
@dataclass
class Readiness:
    """What one run of a plugin said over the socket: data the status shows, and the deadlines
    the supervisor enforces.  Reset for every run (``begin``); times are the loop's clock."""

    ready: bool = False
    status_text: str | None = None
    stopping: bool = False
    watchdog: float | None = None  # seconds between pets, None: no watchdog
    watchdog_deadline: float | None = None
    last_ping: float | None = None
    ready_deadline: float | None = None

    def begin(self, now: float, watchdog: float | None, ready_timeout: float | None) -> None:
        """A new run: nothing said yet; the first watchdog period and the ready timeout start."""
        self.ready = self.stopping = False
        self.status_text = None
        self.last_ping = None
        self.watchdog = watchdog
        self.watchdog_deadline = None if watchdog is None else now + watchdog
        self.ready_deadline = None if ready_timeout is None else now + ready_timeout

    def end(self) -> None:
        """The run is over: nothing is enforced any more (what it said stays visible)."""
        self.ready = False
        self.watchdog_deadline = self.ready_deadline = None

    def apply(self, notice: Notice, now: float) -> Change:
        """Take one datagram; returns what the supervisor must act on."""
        change = Change()
        if notice.status is not None:
            self.status_text = notice.status
        if notice.watchdog and self.watchdog is not None and self.watchdog_deadline is not None:
            self.last_ping = now
            self.watchdog_deadline = now + self.watchdog
        if notice.extend_timeout_usec is not None and self.ready_deadline is not None \
                and not self.ready:
            wanted = now + notice.extend_timeout_usec / 1e6
            if wanted > self.ready_deadline:
                self.ready_deadline = wanted
                change.extended = True
        if notice.ready and not self.ready:
            self.ready = change.became_ready = True
            self.ready_deadline = None
        if notice.stopping and not self.stopping:
            self.stopping = change.stopping = True
            self.watchdog_deadline = None  # ending by itself: no longer held to its pets
        if notice.watchdog_trigger:  # as systemd: acted on with or without a watchdog period
            change.trigger = True
        return change

    def view(self, now: float) -> dict[str, object]:
        """The fields ``/status`` adds: ``ready``, ``status_text``, ``watchdog`` (seconds or
        null) and ``watchdog_left`` (seconds until a miss, null when not enforced)."""
        left = None if self.watchdog_deadline is None else round(
            max(0.0, self.watchdog_deadline - now), 3)
        return {"ready": self.ready, "status_text": self.status_text,
                "watchdog": self.watchdog, "watchdog_left": left}


@dataclass
class Change:
    """What a datagram changed that the supervisor acts on."""

    became_ready: bool = False
    trigger: bool = False  # WATCHDOG=trigger: end the run as a watchdog failure
    stopping: bool = False
    extended: bool = False  # the ready deadline moved (EXTEND_TIMEOUT_USEC)
