"""What runs here and why: the one decision that both ``list`` and ``run`` use.

Keeping selection in one pure-ish function is what guarantees ``list`` never disagrees with
``run``; the supervisor only executes a plan.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from typing import Any

from .advice import crlf_warning, option_name_warnings
from .config import LauncherConfig
from .discovery import IgnoredFile, PluginFile, discover, insecure_reason
from .interpreter import MAX_SHEBANG, InterpreterError, command_for
from .naming import parse_name
from .options import PluginOptions


@dataclass(frozen=True)
class Decision:
    name: str
    path: str
    selected: bool
    reason: str  # why it runs here, or why not
    command: list[str] | None = None
    error: str | None = None  # selected but cannot run
    warnings: tuple[str, ...] = ()
    options: PluginOptions = field(default_factory=PluginOptions)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "selected": self.selected,
            "reason": self.reason,
            "command": self.command,
            "error": self.error,
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class Plan:
    decisions: list[Decision]
    warnings: list[str]
    ignored: list[IgnoredFile] = field(default_factory=list)  # shown by `list --all` only

    @property
    def selected(self) -> list[Decision]:
        return [d for d in self.decisions if d.selected]


def decide(
    plugin: PluginFile,
    config: LauncherConfig,
    role: str | None,
    worker_id: int | None,
) -> Decision:
    target = parse_name(plugin.name)
    not_here = target.mismatch(role, worker_id)
    options = config.options.for_plugin(plugin.name)
    if not_here is not None:
        return Decision(plugin.name, plugin.path, False, not_here, options=options)
    warnings: list[str] = []
    insecure = insecure_reason(plugin)
    if insecure is not None:
        if not config.allow_insecure_plugins:
            refused = f"refused: {insecure}"
            return Decision(plugin.name, plugin.path, False, refused, options=options)
        warnings.append(f"insecure plugin allowed: {insecure}")
    if role is None:
        reason = "no role here: every file runs"
    elif target.role == "ALL":
        reason = "targets every role"
    else:
        reason = f"targets role {target.role}"
    if target.worker_id is not None and role is not None:
        reason += f", worker {target.worker_id}"
    argv: list[str] | None = None
    error: str | None = None
    try:
        command = command_for(plugin.path, first_line(plugin.path))
    except OSError as exc:
        error = f"{plugin.path}: cannot read: {exc.strerror}"
    except InterpreterError as exc:
        error = str(exc)
    else:
        argv = command.argv
        if command.warning:
            warnings.append(command.warning)
        crlf = crlf_warning(plugin.path)
        if crlf is not None:
            warnings.append(crlf)
    return Decision(plugin.name, plugin.path, True, reason, argv, error, tuple(warnings), options)


def first_line(path: str) -> bytes:
    """The file's first line; never blocks, even on a FIFO or device swapped in since the walk."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return f.readline(MAX_SHEBANG)


def _decide_contained(
    plugin: PluginFile, config: LauncherConfig, role: str | None, worker_id: int | None,
) -> Decision:
    """``decide``, with any error reading the file kept to this file: the others still run."""
    try:
        return decide(plugin, config, role, worker_id)
    except (OSError, ValueError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return Decision(plugin.name, plugin.path, False, f"refused: {plugin.path}: {detail}",
                        options=config.options.for_plugin(plugin.name))


def make_plan(config: LauncherConfig, role: str | None, worker_id: int | None) -> Plan:
    ignored: list[IgnoredFile] = []
    files, warnings = discover(config.plugin_locations, ignored)
    warnings += option_name_warnings(config.options.by_name, [f.name for f in files])
    decisions = [_decide_contained(f, config, role, worker_id) for f in files]
    return Plan(decisions, warnings, ignored)
