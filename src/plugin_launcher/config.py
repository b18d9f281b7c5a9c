"""Configuration: an ``lmcache.yaml``-style file, or environment variables, made typed and checked.

Every key of the file is kept (plugins receive the whole thing as JSON); the keys the launcher
itself reads are checked here so a mistake is one clear line naming the file and the key.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .options import OptionError, OptionTable, parse_options

CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"
LOCATION_KEYS = ("runtime_plugin_locations", "plugin_locations")
LOCATIONS_ENV = "LMCACHE_PLUGIN_LOCATIONS"
RUNTIME_LOCATIONS_ENV = "LMCACHE_RUNTIME_PLUGIN_LOCATIONS"
EXTRA_CONFIG_ENV = "LMCACHE_EXTRA_CONFIG"
MAX_CONFIG_BYTES = 16 << 20
log = logging.getLogger("plugin_launcher.config")
MAX_CONFIG_NODES = 1_000_000
MAX_CONFIG_DEPTH = 100  # nesting levels; deeper would overflow the YAML or JSON recursion


class ConfigError(Exception):
    """Bad configuration; the message names the file (or variable) and the key."""


@dataclass(frozen=True)
class LauncherConfig:
    plugin_locations: list[str]
    extra_config: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    source: str = "<dict>"
    options: OptionTable = field(default_factory=OptionTable)
    allow_insecure_plugins: bool = False
    watch_plugins: bool = False
    config_json: str | None = None

    def to_json(self) -> str:
        """The whole configuration as plugins see it in LMCACHE_PLUGIN_CONFIG."""
        if self.config_json is not None:
            return self.config_json
        return json.dumps(self.data, default=str)

    def with_locations(self, extra: Sequence[str]) -> LauncherConfig:
        locations = [*self.plugin_locations, *extra]
        data = {**self.data, "plugin_locations": locations}
        return replace(self, plugin_locations=locations, data=data, config_json=None)


def _count_nodes(value: Any, source: str) -> None:
    """Refuse alias bombs: YAML shares aliased nodes, JSON (what plugins get) would expand them."""
    count = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > MAX_CONFIG_NODES:
            raise ConfigError(
                f"{source}: configuration expands to more than {MAX_CONFIG_NODES:,} values "
                "(YAML alias bomb?)"
            )
        if depth > MAX_CONFIG_DEPTH:
            raise _too_deep(source)
        if isinstance(item, Mapping):
            stack.extend((key, depth + 1) for key in item.keys())
            stack.extend((sub, depth + 1) for sub in item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend((sub, depth + 1) for sub in item)


def _too_deep(source: str) -> ConfigError:
    return ConfigError(f"{source}: configuration is nested more than {MAX_CONFIG_DEPTH} levels "
                       "deep")


def _locations(data: Mapping[str, Any], source: str) -> list[str]:
    """``runtime_plugin_locations`` (LMCache 0.4+) and ``plugin_locations`` (its older name, still
    read by LMCache as an alias): both are read, in that order, each path once."""
    found: list[str] = []
    for key in LOCATION_KEYS:
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
            raise ConfigError(f"{source}: {key}: expected a list of paths, got {data[key]!r}")
        found.extend(x for x in value if x not in found)
    return found


def from_mapping(data: Mapping[str, Any], source: str = "<dict>") -> LauncherConfig:
    """Check the keys the launcher reads; keep every other key as it is."""
    if not isinstance(data, Mapping):
        kind = type(data).__name__
        raise ConfigError(f"{source}: expected a mapping at the top level, got {kind}")
    data = dict(data)
    _count_nodes(data, source)
    locations = _locations(data, source)
    extra = data.get("extra_config")
    if extra is None:
        extra = {}
    if not isinstance(extra, Mapping):
        kind = type(extra).__name__
        raise ConfigError(f"{source}: extra_config: expected a mapping, got {kind}")
    flags: dict[str, bool] = {}
    for key in ("allow_insecure_plugins", "watch_plugins"):
        value = data.get(key, False)
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true or false, got {value!r}")
        flags[key] = value
    try:
        options = parse_options(data.get("plugin_options"))
    except OptionError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    present = [key for key in LOCATION_KEYS if key in data] or ["plugin_locations"]
    for key in present:  # the keys the user wrote, each with the whole list
        data[key] = list(locations)
    data["extra_config"] = dict(extra)
    try:
        json.dumps(data, default=str)
    except RecursionError:
        raise _too_deep(source) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: cannot be passed to plugins as JSON: {exc}") from None
    return LauncherConfig(
        # searched as absolute paths, resolved now: a later chdir() of the host cannot move them
        plugin_locations=[os.path.abspath(x) for x in locations],
        extra_config=dict(extra),
        data=data,
        source=source,
        options=options,
        allow_insecure_plugins=flags["allow_insecure_plugins"],
        watch_plugins=flags["watch_plugins"],
    )


def load_file(path: str | os.PathLike[str]) -> LauncherConfig:
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: configuration is larger than {MAX_CONFIG_BYTES >> 20} MiB")
    import yaml  # here, not at the top: `run` without a file need not pay for it

    try:
        data = yaml.safe_load(raw)
    except RecursionError:  # PyYAML composes nested nodes recursively
        raise _too_deep(path) from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{line}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        kind = type(data).__name__
        raise ConfigError(f"{path}: expected a mapping at the top level, got {kind}")
    return from_mapping(data, path)


def _env_locations(env: Mapping[str, str]) -> dict[str, list[str]]:
    """LMCACHE_RUNTIME_PLUGIN_LOCATIONS and LMCACHE_PLUGIN_LOCATIONS (a JSON list or
    comma-separated paths each), under the configuration key each one stands for."""
    found: dict[str, list[str]] = {}
    for name, key in ((RUNTIME_LOCATIONS_ENV, LOCATION_KEYS[0]), (LOCATIONS_ENV, LOCATION_KEYS[1])):
        raw = env.get(name, "").strip()
        if not raw:
            continue
        if raw.startswith("["):
            try:
                value = json.loads(raw)
            except ValueError as exc:
                raise ConfigError(f"{name}: malformed JSON list: {exc}") from None
            if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
                raise ConfigError(f"{name}: expected a list of paths, got {value!r}")
        else:
            value = [p.strip() for p in raw.split(",") if p.strip()]
        found[key] = value
    return found


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    overrides.update(_env_locations(env))
    raw = env.get(EXTRA_CONFIG_ENV, "").strip()
    if raw:
        try:
            extra = json.loads(raw)
        except ValueError as exc:
            raise ConfigError(f"{EXTRA_CONFIG_ENV}: malformed JSON: {exc}") from None
        if not isinstance(extra, dict):
            kind = type(extra).__name__
            raise ConfigError(f"{EXTRA_CONFIG_ENV}: expected a JSON object, got {kind}")
        overrides["extra_config"] = extra
    return overrides


def load_config(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> LauncherConfig:
    """The file at ``path`` (else the one named by LMCACHE_CONFIG_FILE), then the environment.

    LMCache's rule (0.3 and 0.5 alike: ``from_file`` then ``update_config_from_env``): a variable
    that is set wins over the file's key, key by key: LMCACHE_RUNTIME_PLUGIN_LOCATIONS /
    LMCACHE_PLUGIN_LOCATIONS over the locations, LMCACHE_EXTRA_CONFIG over ``extra_config``.
    """
    env = os.environ if env is None else env
    if path is None:
        path = env.get(CONFIG_FILE_ENV) or None
    overrides = _env_overrides(env)
    if path is None:
        return from_mapping(overrides, "environment")
    config = load_file(path)
    if not overrides:
        return config
    data = dict(config.data)
    if any(key in overrides for key in LOCATION_KEYS):
        for key in LOCATION_KEYS:  # the variables replace the file's list, whichever key held it
            data.pop(key, None)
    for key in overrides:
        if key in config.data or key in LOCATION_KEYS:
            log.info("%s: %s is taken from the environment (the environment wins, as in "
                     "LMCache)", config.source, key)
    return from_mapping({**data, **overrides}, config.source)


def coerce_config(config: Any) -> LauncherConfig:
    """Accept our config, a plain dict, or LMCache's config object (plugin_locations + to_json)."""
    if isinstance(config, LauncherConfig):
        return config
    if isinstance(config, Mapping):
        return from_mapping(config)
    if hasattr(config, "to_json") and any(hasattr(config, key) for key in LOCATION_KEYS):
        config_json = config.to_json()
        if not isinstance(config_json, str):
            raise TypeError(f"{type(config).__name__}.to_json() returned "
                            f"{type(config_json).__name__}, not str")
        try:
            data = json.loads(config_json)
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        for key in LOCATION_KEYS:  # the object's attributes are the truth, not its JSON
            data.pop(key, None)
            value = getattr(config, key, None)
            if value:
                data[key] = [value] if isinstance(value, str) else list(value)
        extra = getattr(config, "extra_config", None)
        if isinstance(extra, Mapping):
            data["extra_config"] = dict(extra)
        else:
            data.pop("extra_config", None)
        parsed = from_mapping(data, type(config).__name__)
        return replace(parsed, config_json=config_json)  # plugins get to_json() byte for byte
    raise TypeError(
        "config must be a LauncherConfig, a mapping, or an object with to_json() and "
        "runtime_plugin_locations (LMCache 0.4+) or plugin_locations (LMCache 0.3)"
    )
