"""The file-name rule that says which process a plugin runs in.

``<ROLE>[_<WORKER_ID>][_<DESCRIPTION>].<ext>``: the role is case-insensitive and ``all`` means every
role; a worker ID is only read from a name of three or more parts, so ``worker_0.sh`` (two parts)
runs on every worker, exactly as LMCache reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

ALL_ROLES = "ALL"


@dataclass(frozen=True)
class Target:
    """Where a plugin file asks to run: a role (or every role) and maybe one worker."""

    role: str
    worker_id: int | None = None

    def mismatch(self, role: str | None, worker_id: int | None) -> str | None:
        """Why a process of ``role``/``worker_id`` does not run this plugin, or None if it does.

        ``role`` None is a process without a role (LMCache's MP server): every file runs there.
        """
        if role is None:
            return None
        if not self.role:
            return "file name has no role"
        if self.role != ALL_ROLES and self.role != role.upper():
            return f"targets role {self.role}"
        if self.worker_id is not None and self.worker_id != worker_id:
            return f"targets worker {self.worker_id}"
        return None


def parse_name(file_name: str) -> Target:
    """Read the target from a file name (with or without folders and extension)."""
    base = file_name.replace("\\", "/").rsplit("/", 1)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base
    parts = stem.split("_")
    role = parts[0].upper()
    worker_id = None
    if len(parts) >= 3 and parts[1].isascii() and parts[1].isdigit() and len(parts[1]) < 4000:
        worker_id = int(parts[1])
    return Target(role, worker_id)
