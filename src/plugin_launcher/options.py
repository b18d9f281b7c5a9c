"""Per-plugin supervision options (`plugin_options` in the configuration).

``default`` applies to every plugin; an entry named after a plugin overrides it key by key.  Every
value is checked here, once, so the supervisor never meets a bad one.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

RESTART_POLICIES = ("never", "on-failure", "always")
READY_MODES = ("notify",)  # `ready: notify`: starting until READY=1 (sd_notify)
SCOPES = ("process", "host")  # `scope: host`: one launcher on the host runs it
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# Bounds on every duration (seconds): an absurd value is a typo, and inf or years would overflow
# the selector's timeout or the guardian's wait; a backoff below MIN_BACKOFF would spin.
MAX_DURATION = 30 * 24 * 3600.0  # timeout, backoff.max, backoff.reset: 30 days
MAX_STOP_TIMEOUT = 3600.0  # stop_timeout / --stop-timeout: 1 hour
MIN_BACKOFF = 0.05  # backoff.initial
MAX_CPU_TIME = 10 * 365 * 24 * 3600  # cpu_time_max: 10 years of CPU seconds
MIN_WATCHDOG = 0.1  # watchdog, ready_timeout: a shorter period could not be met reliably
MAX_SCOPE_KEY = 200  # characters of scope_key (it names a lock file)
DEFAULT_READY_TIMEOUT = 90.0  # systemd's default TimeoutStartSec


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
    log_file: str | None = None  # template: {name}, {role}, {worker_id}
    log_max_bytes: int = 10 << 20  # 0: never rotate
    log_backups: int = 5
    ready: str | None = None  # "notify": starting until READY=1
    ready_timeout: float = DEFAULT_READY_TIMEOUT  # with ready: notify; then a failure
    watchdog: float | None = None  # seconds between WATCHDOG=1 pets; a miss is a failure
    scope: str = "process"  # "host": one launcher of the host runs it, the others stand by
    scope_key: str | None = None  # tells apart groups of launchers on one host

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


def _duration(key: str, value: Any, minimum: float, maximum: float) -> float:
    """Seconds, finite and within [minimum, maximum]; the message gives the allowed range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(f"{key}: expected a number, got {value!r}")
    if not minimum <= value <= maximum:  # also false for nan; exact for huge integers
        raise OptionError(f"{key}: must be between {minimum:g} and {maximum:.0f} seconds "
                          f"({describe_seconds(maximum)}), got {_shown(value)}")
    return float(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def describe_seconds(seconds: float) -> str:
    """``2592000`` -> ``30 days``: the bound in words, for error messages."""
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit[:-1] if count == 1 else unit}"
    return f"{seconds:g} s"


def check_stop_timeout(key: str, value: Any) -> float:
    """A stop timeout (config key or ``--stop-timeout``): 0 to MAX_STOP_TIMEOUT seconds."""
    return _duration(key, value, 0.0, MAX_STOP_TIMEOUT)


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


LOG_FILE_FIELDS = ("name", "role", "worker_id")


def check_log_file(key: str, value: Any) -> str | None:
    """A ``log_file`` template: a path where only ``{name}``, ``{role}``, ``{worker_id}`` are
    filled in (``{{`` for a literal brace)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise OptionError(f"{key}: expected a file path, got {value!r}")
    try:
        used = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
    except ValueError as exc:
        raise OptionError(f"{key}: {exc} in {value!r} (write {{{{ for a brace)") from None
    for field_name in used:
        if field_name not in LOG_FILE_FIELDS:
            known = ", ".join(f"{{{f}}}" for f in LOG_FILE_FIELDS)
            raise OptionError(f"{key}: unknown field {{{field_name}}} in {value!r} "
                              f"(known: {known})")
    return value


def check_scope_key(key: str, value: Any) -> str | None:
    """A ``scope_key``: non-empty text without NUL or control characters, at most
    MAX_SCOPE_KEY characters (it becomes part of a lock file's name)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_SCOPE_KEY or any(
            ord(c) < 32 or ord(c) == 127 for c in value):
        raise OptionError(f"{key}: expected a short name (at most {MAX_SCOPE_KEY} printable "
                          f"characters), got {_shown(value)}")
    return value


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
                low = MIN_BACKOFF if sub == "initial" else 0.0
                changes[f"backoff_{sub}"] = _duration(f"{name}.{sub}", sub_value, low,
                                                      MAX_DURATION)
        elif key == "stop_timeout":
            changes[key] = check_stop_timeout(name, value)
        elif key == "timeout":
            if value == 0 and not isinstance(value, bool):
                raise OptionError(f"{name}: must be positive or null, got 0")
            changes[key] = None if value is None else _duration(name, value, 0.0, MAX_DURATION)
        elif key == "nice":
            changes[key] = _integer(name, value, minimum=-20, maximum=19)
        elif key == "memory_max":
            changes[key] = parse_size(name, value)
        elif key == "open_files_max":
            changes[key] = _integer(name, value, minimum=1)
        elif key == "cpu_time_max":
            changes[key] = _integer(name, value, minimum=1, maximum=MAX_CPU_TIME)
        elif key == "log_file":
            changes[key] = check_log_file(name, value)
        elif key == "log_max_bytes":
            never = value == "0" or (value == 0 and type(value) is int)
            changes[key] = 0 if never else parse_size(name, value)
        elif key == "log_backups":
            changes[key] = _integer(name, value, minimum=0, maximum=1000)
        elif key == "ready":
            if value not in (None, *READY_MODES):
                raise OptionError(f"{name}: expected notify or null, got {_shown(value)}")
            changes[key] = value
        elif key == "ready_timeout":
            changes[key] = _duration(name, value, MIN_WATCHDOG, MAX_DURATION)
        elif key == "watchdog":
            changes[key] = None if value is None else _duration(name, value, MIN_WATCHDOG,
                                                                MAX_DURATION)
        elif key == "scope":
            if value not in SCOPES:
                raise OptionError(f"{name}: expected one of {', '.join(SCOPES)}, "
                                  f"got {_shown(value)}")
            changes[key] = value
        elif key == "scope_key":
            changes[key] = check_scope_key(name, value)
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
