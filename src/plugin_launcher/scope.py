"""Once-per-host plugins (``scope: host``): one launcher of the host runs the plugin, the others
stand by and one of them takes over when the holder's launcher stops or dies.

The decision is a kernel lock, never a PID-file guess: ``flock(LOCK_EX)`` on
``<folder>/<key>.lock``.  The kernel drops the lock when the last descriptor of the holder's open
file goes away, however the holder ends (exit, SIGKILL, crash, OOM kill), so there is no stale
state to clean up.  The descriptor is close-on-exec (plugins and wrapped commands never inherit
it) and is closed in a child forked without exec (``os.register_at_fork``), so only the launcher
itself ever holds it.  A standby launcher retries ``LOCK_NB`` every ``RETRY`` seconds on the
supervisor's timer heap: no thread, one cheap system call per retry, takeover within ``RETRY``.
The file itself only says, for people, who holds it (``pid=... role=... worker=...``).
"""

from __future__ import annotations

import fcntl
import os
import weakref

from .folders import private_folder

ENV_FOLDER = "PLUGIN_LAUNCHER_LOCK_DIR"  # overrides the folder (tests, unusual hosts)
RETRY = 0.5  # seconds between a standby launcher's attempts: takeover within this much
MAX_FILE_NAME = 200  # bytes; a longer key is shortened with a hash


class ScopeError(RuntimeError):
    """The lock folder or file cannot be used safely: one line naming the path."""


def lock_folder(uid: int | None = None, environ: dict[str, str] | None = None) -> str:
    """Where the lock files go, the same for every launcher of this user whatever its
    environment: ``$PLUGIN_LAUNCHER_LOCK_DIR`` if set, else ``/run/lock/plugin-launcher-<uid>``
    (a tmpfs cleared at boot) when ``/run/lock`` exists, else ``/tmp/plugin-launcher-<uid>/scope``.
    (``$XDG_RUNTIME_DIR`` is not used: processes of one user may disagree about it.)"""
    env = os.environ if environ is None else environ
    uid = os.getuid() if uid is None else uid
    override = env.get(ENV_FOLDER, "")
    if override:
        return override
    if os.path.isdir("/run/lock") and os.access("/run/lock", os.W_OK | os.X_OK):
        return f"/run/lock/plugin-launcher-{uid}"
    return f"/tmp/plugin-launcher-{uid}/scope"


def lock_name(name: str, scope_key: str | None) -> str:
    """The lock file's name for plugin ``name`` under ``scope_key`` (pure): both parts
    percent-encoded (so ``/`` and odd bytes cannot escape the folder), shortened with a hash
    past MAX_FILE_NAME bytes."""
    import hashlib  # only for scope: host plugins: not on every start (with urllib, ~6 ms)
    from urllib.parse import quote

    key = quote(scope_key or "default", safe="")
    raw = f"{key}--{quote(name, safe='', errors='surrogateescape')}"
    if len(raw) > MAX_FILE_NAME:
        digest = hashlib.sha256(raw.encode()).hexdigest()[:16]
        raw = f"{raw[:MAX_FILE_NAME - 18]}-{digest}"
    return raw + ".lock"


def ensure_folder(folder: str) -> None:
    """Create ``folder`` (and its parents) with mode 0700; refuse one others could tamper with."""
    problem = private_folder(folder)
    if problem is not None:
        raise ScopeError(f"lock folder {folder} {problem}; refusing to use it")


_held: weakref.WeakSet[HostLock] = weakref.WeakSet()


def _forget_in_child() -> None:
    """In a child forked without exec: close every lock descriptor inherited from the parent,
    so the lock goes when the launcher goes, not when its last forked child does."""
    for lock in list(_held):
        lock.forget()


os.register_at_fork(after_in_child=_forget_in_child)


class HostLock:
    """One ``scope: host`` lock.  ``try_acquire()`` never blocks; ``release()`` lets another
    launcher take over."""

    def __init__(self, path: str, owner: str = "") -> None:
        self.path = path
        self.owner = owner  # written into the file for people: who holds it
        self.fd: int | None = None
        self.held = False

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; True if we hold it now.  ScopeError if the file
        cannot be opened (a folder problem is raised by ``ensure_folder`` first)."""
        if self.held:
            return True
        if self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
                                  | os.O_NOFOLLOW, 0o600)
            except OSError as exc:
                raise ScopeError(f"cannot open lock file {self.path}: {exc.strerror}") from None
            _held.add(self)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise ScopeError(f"cannot lock {self.path}: {exc.strerror}") from None
        self.held = True
        try:  # for people only; the lock is the truth
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{self.owner}\n".encode(), 0)
        except OSError:
            pass
        return True

    def holder(self) -> str:
        """Who holds the lock, as the holder wrote it ("" if unknown)."""
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                return f.read(200).strip()
        except OSError:
            return ""

    def release(self) -> None:
        """Give the lock up (closing the descriptor is what releases it)."""
        fd, self.fd, self.held = self.fd, None, False
        _held.discard(self)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def forget(self) -> None:
        """In a forked child: drop the inherited descriptor (the parent still holds the lock)."""
        self.release()


def open_lock(name: str, scope_key: str | None, owner: str, folder: str | None = None) -> HostLock:
    """The lock of plugin ``name`` (its folder created and checked); not yet acquired."""
    folder = lock_folder() if folder is None else folder
    ensure_folder(folder)
    return HostLock(os.path.join(folder, lock_name(name, scope_key)), owner)
