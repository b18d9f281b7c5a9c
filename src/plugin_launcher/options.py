"""Per-plugin supervision options (`plugin_options` in the configuration).

``default`` applies to every plugin; an entry named after a plugin overrides it key by key.  Every
value is checked here, once, so the supervisor never meets a bad one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

RESTART_POLICIES = ("never", "on-failure", "always")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class OptionError(ValueError):
    """A bad plugin option; the message names the key."""


@dataclass(frozen=True)
class PluginOptions:
    restart: str = "never"
    max_restarts: int = 5
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    backoff_reset: float = 60.0
    stop_timeout: float = 5.0
    timeout: float | None = None
    nice: int | None = None
    memory_max: int | None = None
    open_files_max: int | None = None
    cpu_time_max: int | None = None

    @property
    def has_limits(self) -> bool:
        return any(
            v is not None
            for v in (self.nice, self.memory_max, self.open_files_max, self.cpu_time_max)
        )


def _number(key: str, value: Any, *, minimum: float = 0.0, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(f"{key}: expected a number, got {value!r}")
    try:
        finite = math.isfinite(value)
    except OverflowError:
        finite = False
    if not finite:
        raise OptionError(f"{key}: expected a number, got {value!r}")
    if value < minimum:
        raise OptionError(f"{key}: must be >= {minimum:g}, got {value!r}")
    return float(value)


def _integer(key: str, value: Any, *, minimum: int, maximum: int | None = None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"{key}: expected an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise OptionError(f"{key}: must be {bound}, got {value}")
    return value


def parse_size(key: str, value: Any) -> int | None:
    """Bytes from ``512M``, ``1G``, ``1.5GiB`` or a plain integer (binary units, like systemd)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise OptionError(f"{key}: must be positive, got {value}")
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise OptionError(f"{key}: expected a size such as 512M or 2G, got {value!r}")
    number = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not math.isfinite(number) or number >= 1 << 63:
        raise OptionError(f"{key}: too large, got {value!r}")
    size = int(number)
    if size <= 0:
        raise OptionError(f"{key}: must be positive, got {value!r}")
    return size


def _apply(base: PluginOptions, raw: Mapping[str, Any], where: str) -> PluginOptions:
    known = {f.name for f in fields(PluginOptions) if not f.name.startswith("backoff_")}
    known.add("backoff")
    changes: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{where}.{key}"
        if key not in known:
            raise OptionError(f"{name}: unknown option (known: {', '.join(sorted(known))})")
        if key == "restart":
            if value not in RESTART_POLICIES:
                choices = ", ".join(RESTART_POLICIES)
                raise OptionError(f"{name}: expected one of {choices}, got {value!r}")
            changes[key] = value
        elif key == "max_restarts":
            changes[key] = _integer(name, value, minimum=0)
        elif key == "backoff":
            if not isinstance(value, Mapping):
                raise OptionError(f"{name}: expected a mapping of initial/max/reset, got {value!r}")
            for sub, sub_value in value.items():
                if sub not in ("initial", "max", "reset"):
                    raise OptionError(f"{name}.{sub}: unknown option (known: initial, max, reset)")
                changes[f"backoff_{sub}"] = _number(f"{name}.{sub}", sub_value)
        elif key == "stop_timeout":
            changes[key] = _number(name, value)
        elif key == "timeout":
            changes[key] = _number(name, value, allow_none=True)
            if changes[key] == 0:
                raise OptionError(f"{name}: must be positive or null, got 0")
        elif key == "nice":
            changes[key] = _integer(name, value, minimum=-20, maximum=19)
        elif key == "memory_max":
            changes[key] = parse_size(name, value)
        elif key == "open_files_max":
            changes[key] = _integer(name, value, minimum=1)
        elif key == "cpu_time_max":
            changes[key] = _integer(name, value, minimum=1)
    result = replace(base, **changes)
    if result.backoff_max < result.backoff_initial:
        raise OptionError(f"{where}.backoff.max: must be >= backoff.initial")
    return result


@dataclass(frozen=True)
class OptionTable:
    """The parsed ``plugin_options`` section: defaults plus per-plugin overrides."""

    default: PluginOptions = field(default_factory=PluginOptions)
    by_name: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def for_plugin(self, name: str) -> PluginOptions:
        override = self.by_name.get(name)
        if override is None:
            return self.default
        return _apply(self.default, override, f"plugin_options.{name}")

    def with_default(self, **changes: Any) -> OptionTable:
        """A table whose default differs (CLI flags such as --stop-timeout); entries still win."""
        return OptionTable(replace(self.default, **changes), self.by_name)


def parse_options(raw: Any) -> OptionTable:
    if raw is None:
        return OptionTable()
    if not isinstance(raw, Mapping):
        raise OptionError(f"plugin_options: expected a mapping, got {type(raw).__name__}")
    default = PluginOptions()
    by_name: dict[str, Mapping[str, Any]] = {}
    for name, entry in raw.items():
        if not isinstance(entry, Mapping):
            raise OptionError(f"plugin_options.{name}: expected a mapping, got {entry!r}")
        if name == "default":
            default = _apply(default, entry, "plugin_options.default")
        else:
            by_name[str(name)] = dict(entry)
    table = OptionTable(default, by_name)
    for name in by_name:  # validate every entry now, not when the plugin first starts
        table.for_plugin(name)
    return table
