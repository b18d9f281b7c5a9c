"""Configuration: an ``lmcache.yaml``-style file, or environment variables, made typed and checked.

Every key of the file is kept (plugins receive the whole thing as JSON); the keys the launcher
itself reads are checked here so a mistake is one clear line naming the file and the key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from .options import OptionError, OptionTable, parse_options

CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"
LOCATIONS_ENV = "LMCACHE_PLUGIN_LOCATIONS"
EXTRA_CONFIG_ENV = "LMCACHE_EXTRA_CONFIG"
MAX_CONFIG_BYTES = 16 << 20
MAX_CONFIG_NODES = 1_000_000


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
    stack = [value]
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_CONFIG_NODES:
            raise ConfigError(
                f"{source}: configuration expands to more than {MAX_CONFIG_NODES:,} values "
                "(YAML alias bomb?)"
            )
        if isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def from_mapping(data: Mapping[str, Any], source: str = "<dict>") -> LauncherConfig:
    """Check the keys the launcher reads; keep every other key as it is."""
    if not isinstance(data, Mapping):
        kind = type(data).__name__
        raise ConfigError(f"{source}: expected a mapping at the top level, got {kind}")
    data = dict(data)
    _count_nodes(data, source)
    locations = data.get("plugin_locations")
    if locations is None:
        locations = []
    elif isinstance(locations, str):
        locations = [locations]
    if not isinstance(locations, list) or not all(isinstance(x, str) and x for x in locations):
        got = data["plugin_locations"]
        raise ConfigError(f"{source}: plugin_locations: expected a list of paths, got {got!r}")
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
    data["plugin_locations"] = locations
    data["extra_config"] = dict(extra)
    try:
        json.dumps(data, default=str)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: cannot be passed to plugins as JSON: {exc}") from None
    return LauncherConfig(
        plugin_locations=list(locations),
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
    try:
        data = yaml.safe_load(raw)
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


def _from_env(env: Mapping[str, str]) -> LauncherConfig:
    data: dict[str, Any] = {}
    raw = env.get(LOCATIONS_ENV, "").strip()
    if raw:
        if raw.startswith("["):
            try:
                data["plugin_locations"] = json.loads(raw)
            except ValueError as exc:
                raise ConfigError(f"{LOCATIONS_ENV}: malformed JSON list: {exc}") from None
        else:
            data["plugin_locations"] = [p.strip() for p in raw.split(",") if p.strip()]
    raw = env.get(EXTRA_CONFIG_ENV, "").strip()
    if raw:
        try:
            extra = json.loads(raw)
        except ValueError as exc:
            raise ConfigError(f"{EXTRA_CONFIG_ENV}: malformed JSON: {exc}") from None
        if not isinstance(extra, dict):
            kind = type(extra).__name__
            raise ConfigError(f"{EXTRA_CONFIG_ENV}: expected a JSON object, got {kind}")
        data["extra_config"] = extra
    locations = data.get("plugin_locations")
    if locations is not None and not (
        isinstance(locations, list) and all(isinstance(x, str) and x for x in locations)
    ):
        raise ConfigError(f"{LOCATIONS_ENV}: expected a list of paths, got {locations!r}")
    return from_mapping(data, "environment")


def load_config(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> LauncherConfig:
    """The file at ``path``, else the file named by LMCACHE_CONFIG_FILE, else the env variables.

    As in LMCache, when a file is given the LMCACHE_PLUGIN_LOCATIONS / LMCACHE_EXTRA_CONFIG
    variables are ignored.
    """
    env = os.environ if env is None else env
    if path is None:
        path = env.get(CONFIG_FILE_ENV) or None
    if path is not None:
        return load_file(path)
    return _from_env(env)


def coerce_config(config: Any) -> LauncherConfig:
    """Accept our config, a plain dict, or LMCache's config object (plugin_locations + to_json)."""
    if isinstance(config, LauncherConfig):
        return config
    if isinstance(config, Mapping):
        return from_mapping(config)
    if hasattr(config, "plugin_locations") and hasattr(config, "to_json"):
        config_json = config.to_json()
        try:
            data = json.loads(config_json)
        except (TypeError, ValueError):
            data = {}
        if not isinstance(data, dict):
            data = {}
        data["plugin_locations"] = config.plugin_locations or []
        extra = getattr(config, "extra_config", None)
        if extra is not None:
            data["extra_config"] = extra
        parsed = from_mapping(data, type(config).__name__)
        return replace(parsed, config_json=config_json)
    raise TypeError(
        "config must be a LauncherConfig, a mapping, "
        "or an object with plugin_locations and to_json()"
    )
