"""Kernel file events for live reload: inotify through ctypes, one fd in the supervisor's selector.

No thread and no polling: the inotify descriptor wakes the same ``selectors`` loop that pumps
output, so ``--watch`` keeps the launcher's idle cost at zero.  Events only say "something changed
here"; the launcher then re-plans and compares, so no event needs to be interpreted exactly.
A folder deleted and recreated is a new inode: its old watch ends (IN_IGNORED) and the next
``watch_tree`` adds a new one; each location's parent is watched for the location's own name, so
a deleted root is noticed when it comes back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
        | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF)
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name


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
        self._folders: dict[int, str] = {}  # watch descriptor -> folder
        self._only: dict[int, set[str] | None] = {}  # wd -> entry names that matter; None: all

    def watch(self, folder: str, only: str | None = None) -> None:
        """Watch ``folder``; with ``only``, just events about that entry (a location's parent).

        Always asks the kernel: the same inode gives back the same watch, a folder recreated
        under the same path gets a new one."""
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(folder), MASK)
        if wd < 0:
            return
        self._folders[wd] = folder
        names = self._only.get(wd, set())
        if only is None or names is None:
            self._only[wd] = None
        else:
            names.add(only)
            self._only[wd] = names

    def watch_tree(self, locations: list[str]) -> None:
        """Every folder under the locations (hidden ones skipped), and a file location's folder."""
        for location in locations:
            absolute = os.path.abspath(location)
            parent = os.path.dirname(absolute)
            if parent != absolute and os.path.isdir(parent):  # the location itself may come
                self.watch(parent, only=os.path.basename(absolute))  # and go
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

    def drain(self) -> bool:
        """Read every pending event; True if any of them matters."""
        seen = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return seen
            if not data:
                return seen
            seen = self._parse(data) or seen

    def _parse(self, data: bytes) -> bool:
        relevant = False
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            start = offset + _EVENT.size
            name = os.fsdecode(data[start:start + length].rstrip(b"\0"))
            offset = start + length
            if mask & IN_IGNORED:  # the folder is gone: a later watch_tree watches it anew
                self._folders.pop(wd, None)
                self._only.pop(wd, None)
                relevant = True
            elif mask & IN_Q_OVERFLOW:
                relevant = True
            else:
                only = self._only.get(wd)
                relevant = relevant or only is None or name in only
        return relevant

    def close(self) -> None:
        os.close(self.fd)
