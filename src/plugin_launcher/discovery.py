"""Finding plugin files under the configured locations.

The walk is deterministic (sorted by path), never hangs on symlink loops (folders are visited once
by device and inode), runs a file reached twice only once, and turns every unreadable folder into a
warning instead of an exception: one bad folder must not hide the others' plugins.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from .advice import describe_path

PLUGIN_EXTENSIONS = (".py", ".sh")
SKIPPED_FOLDERS = ("__pycache__",)


@dataclass(frozen=True)
class PluginFile:
    name: str  # path relative to the location it was found in
    path: str  # path as found (location joined with name)
    location: str


@dataclass(frozen=True)
class IgnoredFile:
    """A file the walk passed over (shown by ``list --all``); never part of a plan."""

    name: str
    path: str
    location: str
    reason: str  # "extension .txt", "hidden", "not a regular file", "in __pycache__"


def _extension_reason(name: str) -> str:
    ext = os.path.splitext(name)[1]
    return f"extension {ext}" if ext else "no extension"


def _ignore_folder(folder: str, relative: str, location: str, reason: str,
                   ignored: list[IgnoredFile]) -> None:
    """Record the files directly in a skipped folder (such as ``__pycache__``)."""
    try:
        with os.scandir(folder) as it:
            names = sorted(e.name for e in it)
    except OSError:
        names = []
    for name in names:
        ignored.append(IgnoredFile(f"{relative}/{name}", os.path.join(folder, name), location,
                                   reason))


def _not_regular(path: str) -> str | None:
    """What ``path`` is if it exists and is no regular file (``FIFO``, ``socket``...), else
    None (a regular file, or one that cannot be examined: never raises)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode):
        return None
    for test, kind in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISDIR, "folder")):
        if test(mode):
            return kind
    return "special file"


def _is_candidate(entry_name: str) -> bool:
    return not entry_name.startswith(".") and entry_name.lower().endswith(PLUGIN_EXTENSIONS)


def _walk(location: str, warnings: list[str],
          ignored: list[IgnoredFile] | None = None) -> list[PluginFile]:
    found: list[PluginFile] = []
    seen_dirs: set[tuple[int, int]] = set()

    pending = [(location, "")]
    while pending:  # iterative: a very deep tree must not hit the recursion limit
        folder, relative = pending.pop()
        try:
            st = os.stat(folder)
            key = (st.st_dev, st.st_ino)
            if key in seen_dirs:
                continue
            seen_dirs.add(key)
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            warnings.append(f"{folder}: cannot read folder: {exc.strerror}")
            continue
        subfolders = []
        for entry in entries:
            rel = f"{relative}/{entry.name}" if relative else entry.name
            if entry.name.startswith("."):
                if ignored is not None:
                    ignored.append(IgnoredFile(rel, entry.path, location, "hidden"))
                continue
            try:
                is_dir = entry.is_dir()  # follows symlinks; loops end at seen_dirs
            except OSError:
                is_dir = False
            if is_dir:
                if entry.name not in SKIPPED_FOLDERS:
                    subfolders.append((entry.path, rel))
                elif ignored is not None:
                    _ignore_folder(entry.path, rel, location, f"in {entry.name}", ignored)
            elif _is_candidate(entry.name):
                # Regular files only (a FIFO would block the first-line read); a file that cannot
                # be examined (broken link, link loop, no permission) is kept so that its refusal
                # names it and the error.
                kind = _not_regular(entry.path)
                if kind is None:
                    found.append(PluginFile(rel, entry.path, location))
                else:
                    warnings.append(f"{entry.path}: not a regular file ({kind}), skipped")
                    if ignored is not None:
                        ignored.append(IgnoredFile(rel, entry.path, location,
                                                   "not a regular file"))
            elif ignored is not None:
                ignored.append(IgnoredFile(rel, entry.path, location, _extension_reason(rel)))
        pending.extend(reversed(subfolders))  # visit in path order: the first path wins a tie
    return found


def discover(locations: list[str], ignored: list[IgnoredFile] | None = None
             ) -> tuple[list[PluginFile], list[str]]:
    """Every plugin file under ``locations``, sorted by path, each real file once; and warnings.

    ``ignored``, when given, receives the files the walk passes over and why (``list --all``).
    """
    warnings: list[str] = []
    files: list[PluginFile] = []
    for location in dict.fromkeys(locations):  # a location listed twice is walked once
        try:
            st = os.stat(location)
        except OSError as exc:
            warnings.append(f"{describe_path(location)}: plugin location not usable: "
                            f"{exc.strerror}")
            continue
        if stat.S_ISDIR(st.st_mode):
            files.extend(_walk(location, warnings, ignored))
        elif not stat.S_ISREG(st.st_mode):
            warnings.append(f"{location}: plugin location is neither a folder nor a file")
        else:
            files.append(PluginFile(os.path.basename(location), location, location))
    files.sort(key=lambda f: f.path)
    unique: list[PluginFile] = []
    seen: set[str] = set()
    for f in files:
        real = os.path.realpath(f.path)
        if real not in seen:
            seen.add(real)
            unique.append(f)
    return unique, warnings


def insecure_reason(plugin: PluginFile) -> str | None:
    """Why running this file would be unsafe (like sshd's StrictModes), or None.

    Checks the file and every folder from its location down to it: each must be owned by us or by
    root and not writable by group or others.  stat() follows symlinks, so a link is trusted only
    if its target passes the same check.
    """
    uid = os.geteuid()
    paths = [plugin.path]
    if os.path.islink(plugin.path):  # a link is trusted only if its target's folder is, too
        paths.append(os.path.dirname(os.path.realpath(plugin.path)))
    if plugin.path != plugin.location:
        folder = os.path.dirname(plugin.path)
        while True:
            paths.append(folder)
            if os.path.normpath(folder) == os.path.normpath(plugin.location) or not folder:
                break
            parent = os.path.dirname(folder)
            if parent == folder:
                break
            folder = parent
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            return f"{path}: cannot check permissions: {exc.strerror}"
        if st.st_uid not in (uid, 0):
            return f"{path}: owned by uid {st.st_uid}, not by uid {uid} or root"
        if st.st_mode & 0o022:
            who = "group and others" if st.st_mode & 0o022 == 0o022 else (
                "group" if st.st_mode & 0o020 else "others")
            return f"{path}: writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None
