"""Private folders for sockets and locks: ours alone, or refused.

Another user who owns, or may write to, the folder of a control socket or a host lock could
replace the socket or hold the lock; so such a folder is refused with one line saying why.
"""

from __future__ import annotations

import os
import stat


def folder_problem(st: os.stat_result, uid: int) -> str | None:
    """Why a folder with this stat is unsafe to keep our sockets or locks in, or None."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != uid:
        return f"is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def private_folder(folder: str) -> str | None:
    """Create ``folder`` (and its parents) with mode 0700 if missing; why it cannot be used, or
    None when it is ours alone."""
    try:
        os.makedirs(folder, 0o700, exist_ok=True)
        st = os.lstat(folder)
    except OSError as exc:
        return f"cannot be created: {exc.strerror or exc}"
    return folder_problem(st, os.getuid())
