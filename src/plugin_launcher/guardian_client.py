"""The host's end of the guardian (see ``guardian.py`` for why it exists)."""

from __future__ import annotations

import logging
import os
import subprocess
import threading

from . import guardian

log = logging.getLogger(__name__)


GUARDIAN_EXIT_WAIT = 30.0  # close(): how long the guardian may take ending groups it still has
GUARDIAN_IDLE_WAIT = 1.0  # close(): how long to wait for a guardian with nothing left to end


class GuardianClient:
    """Starts the guardian and tells it which process groups to end if this process dies.

    Never blocks its caller: the pipe is non-blocking, and what the guardian has not read yet
    waits here as the latest word per group (``+`` or ``-``; a ``+`` never sent and then
    forgotten is simply dropped), so a guardian that stops reading costs a few bytes per group,
    never a stalled loop.  ``wants_write()`` tells the supervisor to wait for the pipe.
    """

    def __init__(self) -> None:
        self._popen: subprocess.Popen[bytes] | None = None
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._broken = False
        self._latest: dict[int, str] = {}  # pgid -> its newest message not yet serialised
        self._outgoing = b""  # serialised, partly written
        self._sent: set[int] = set()  # groups the guardian was told to watch
        self.cgroup_roots: list[str] = []  # the launcher's cgroups, swept when the host ends
        self.pidfd: int | None = None  # readable once the guardian has exited

    # A library host gets its idle guardian reaped before stop_plugins() returns; the CLI, which
    # exits right after, sets 0: the guardian exits by itself at end-of-file (saves ~40 ms a run).
    idle_wait = GUARDIAN_IDLE_WAIT

    def start(self) -> None:
        read_end, write_end = os.pipe()  # both close-on-exec: no plugin can hold the pipe open
        try:
            self._popen = subprocess.Popen(
                guardian.command(str(os.getpid()), *self.cgroup_roots),
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
        os.set_blocking(write_end, False)
        self._fd = write_end
        try:
            self.pidfd = os.pidfd_open(self._popen.pid)
        except (AttributeError, OSError):
            self.pidfd = None  # no pidfd: a dead guardian is noticed by the pipe (EPIPE) only

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    def replace(self) -> int | None:
        """The guardian died (killed, or SIGTERMed: it then ends nothing): reap it and start a
        new one, which the caller tells every live group.  Returns the old one's returncode."""
        code = self._popen.wait() if self._popen is not None else None
        with self._lock:
            fd, self._fd = self._fd, None
            self._latest.clear()
            self._outgoing = b""
            self._sent.clear()
            self._broken = False
        for owned in (fd, self.pidfd):
            if owned is not None:
                os.close(owned)
        self.pidfd = None
        self._popen = None
        self.start()
        return code

    @property
    def fd(self) -> int | None:
        return self._fd

    def wants_write(self) -> bool:
        """True while messages wait for the guardian to read its pipe."""
        return bool(self._outgoing or self._latest) and self._fd is not None

    def flush(self) -> None:
        """Send what was queued, as far as the pipe takes it now (the supervisor flushes after
        each loop round, and again whenever the pipe becomes writable)."""
        with self._lock:
            if self._fd is None or not (self._outgoing or self._latest):
                return
            if self._latest:
                self._outgoing += "".join(self._latest.values()).encode()
                for pgid, message in self._latest.items():
                    if message[0] == "+":
                        self._sent.add(pgid)
                    else:
                        self._sent.discard(pgid)
                self._latest.clear()
            try:
                written = os.write(self._fd, self._outgoing)
            except BlockingIOError:
                return  # the guardian is not reading: try again when the pipe is writable
            except OSError as exc:
                if not self._broken:
                    log.error("guardian process is gone (%s): plugins will not be stopped if "
                              "this process is killed", exc)
                self._broken = True
                self._outgoing = b""
                return
            self._outgoing = self._outgoing[written:]

    def watch(self, pgid: int, stop_timeout: float) -> None:
        with self._lock:
            self._latest[pgid] = f"+ {pgid} {stop_timeout}\n"

    def forget(self, pgid: int) -> None:
        with self._lock:
            if pgid in self._latest and pgid not in self._sent:
                del self._latest[pgid]  # the guardian never heard of it: nothing to say
            else:
                self._latest[pgid] = f"- {pgid}\n"

    def close(self) -> None:
        """Let the guardian go: it ends whatever groups it still knows, then exits.  Waits for
        it only as long as it has something to do (``GUARDIAN_EXIT_WAIT`` if it still watches a
        group, else ``GUARDIAN_IDLE_WAIT``); a guardian that does not read is left to itself."""
        self.flush()
        with self._lock:
            fd, self._fd = self._fd, None
            busy = bool(self._sent) or any(m[0] == "+" for m in self._latest.values())
        if fd is not None:
            os.close(fd)
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        if self._popen is not None:
            try:
                self._popen.wait(timeout=GUARDIAN_EXIT_WAIT if busy else self.idle_wait)
            except subprocess.TimeoutExpired:
                pass
            self._popen = None
