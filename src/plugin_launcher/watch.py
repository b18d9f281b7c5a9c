"""Kernel file events for live reload: inotify through ctypes, one fd in the supervisor's selector.

No thread and no polling: the inotify descriptor wakes the same ``selectors`` loop that pumps
output, so ``--watch`` keeps the launcher's idle cost at zero.  Events only say "something changed
here"; the launcher then re-plans and compares, so no event needs to be interpreted exactly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
        | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF)


class WatchError(OSError):
    pass


class Inotify:
    """Watches folders (not recursively by itself: the caller adds every folder it walks)."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("c") or "libc.so.6"
        self._libc = ctypes.CDLL(name, use_errno=True)
        self.fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            errno = ctypes.get_errno()
            raise WatchError(errno, f"inotify_init1: {os.strerror(errno)}")
        self._watched: set[str] = set()

    def watch(self, folder: str) -> None:
        if folder in self._watched:
            return
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(folder), MASK)
        if wd >= 0:
            self._watched.add(folder)

    def watch_tree(self, locations: list[str]) -> None:
        """Every folder under the locations (hidden ones skipped), and a file location's folder."""
        for location in locations:
            if os.path.isdir(location):
                seen: set[str] = set()
                for root, dirs, _files in os.walk(location, followlinks=True):
                    real = os.path.realpath(root)
                    if real in seen:  # a symlink loop: do not descend again
                        dirs[:] = []
                        continue
                    seen.add(real)
                    dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
                    self.watch(root)
            else:
                parent = os.path.dirname(os.path.abspath(location))
                if os.path.isdir(parent):
                    self.watch(parent)

    def drain(self) -> bool:
        """Read every pending event; True if there was any."""
        seen = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return seen
            if not data:
                return seen
            seen = True

    def close(self) -> None:
        os.close(self.fd)
