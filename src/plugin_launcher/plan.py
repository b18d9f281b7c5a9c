"""What runs here and why: the one decision that both ``list`` and ``run`` use.

Keeping selection in one pure-ish function is what guarantees ``list`` never disagrees with
``run``; the supervisor only executes a plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import LauncherConfig
from .discovery import PluginFile, discover, insecure_reason
from .interpreter import InterpreterError, command_for, read_first_line
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

    @property
    def selected(self) -> list[Decision]:
        return [d for d in self.decisions if d.selected]


def decide(
    plugin: PluginFile,
    config: LauncherConfig,
    role: str,
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
    reason = "targets every role" if target.role == "ALL" else f"targets role {target.role}"
    if target.worker_id is not None:
        reason += f", worker {target.worker_id}"
    argv: list[str] | None = None
    error: str | None = None
    try:
        command = command_for(plugin.path, read_first_line(plugin.path))
    except OSError as exc:
        error = f"{plugin.path}: cannot read: {exc.strerror}"
    except InterpreterError as exc:
        error = str(exc)
    else:
        argv = command.argv
        if command.warning:
            warnings.append(command.warning)
    return Decision(plugin.name, plugin.path, True, reason, argv, error, tuple(warnings), options)


def make_plan(config: LauncherConfig, role: str, worker_id: int | None) -> Plan:
    files, warnings = discover(config.plugin_locations)
    return Plan([decide(f, config, role, worker_id) for f in files], warnings)
