"""What a plugin is started with: the identity variables, in both of LMCache's spellings.

LMCache up to 0.3 set ``LMCACHE_PLUGIN_*``; 0.4 and later set ``LMCACHE_RUNTIME_PLUGIN_*`` and keep
the old names for compatibility.  Every plugin gets both, so a plugin written for either era runs
unchanged.  A configuration too large for one environment string (Linux refuses any single string
over 128 KiB with E2BIG, which would make *every* plugin fail to start) is handed over in a private
file instead, named by ``LMCACHE_PLUGIN_CONFIG_FILE``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping

PREFIXES = ("LMCACHE_PLUGIN_", "LMCACHE_RUNTIME_PLUGIN_")
MAX_ARG_STRLEN = 32 * 4096  # Linux: the longest single "NAME=value" string execve() accepts
INLINE_LIMIT = MAX_ARG_STRLEN - 8 * 1024  # keep room for the name and a little headroom


def identity_variables(
    role: str, worker_id: str, worker_count: str, config_json: str
) -> dict[str, str]:
    """The four LMCache variables under both prefixes, with the values given verbatim."""
    values = {"ROLE": role, "WORKER_ID": worker_id, "WORKER_COUNT": worker_count,
              "CONFIG": config_json}
    return {prefix + key: value for prefix in PREFIXES for key, value in values.items()}


def fits_inline(config_json: str) -> bool:
    return len(config_json.encode("utf-8", "surrogatepass")) <= INLINE_LIMIT


def shrink_config(config_json: str) -> tuple[str, list[str]]:
    """The configuration without its largest top-level values until it fits in one variable.

    A plugin that reads only ``LMCACHE_PLUGIN_CONFIG`` still gets valid JSON with every small key;
    the keys left out are listed in ``LMCACHE_PLUGIN_CONFIG_OMITTED`` and the whole configuration
    is in ``LMCACHE_PLUGIN_CONFIG_FILE``.
    """
    try:
        data = json.loads(config_json)
    except ValueError:
        return "{}", []
    if not isinstance(data, dict):
        return "{}", []
    sizes = sorted(((len(json.dumps(v, default=str)), k) for k, v in data.items()), reverse=True)
    omitted: list[str] = []
    text = json.dumps(data, default=str)
    for _size, key in sizes:
        if fits_inline(text):
            break
        del data[key]
        omitted.append(key)
        text = json.dumps(data, default=str)
    return text, omitted


class ConfigHandoff:
    """The configuration as plugins receive it: inline, or in a 0600 file when too large."""

    def __init__(self, config_json: str) -> None:
        self.config_json = config_json
        self.inline = config_json
        self.omitted: list[str] = []
        self.path: str | None = None
        self._folder: str | None = None
        if not fits_inline(config_json):
            self.inline, self.omitted = shrink_config(config_json)

    def variables(self) -> dict[str, str]:
        """Variables to add to every plugin's environment (creates the file on first use)."""
        if fits_inline(self.config_json):
            return {}
        if self.path is None or not os.path.exists(self.path):
            self._folder = tempfile.mkdtemp(prefix="plugin-launcher-config-")  # mode 0700
            path = os.path.join(self._folder, "config.json")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8", errors="surrogatepass") as f:
                f.write(self.config_json)
            self.path = path
        extra = {}
        for prefix in PREFIXES:
            extra[prefix + "CONFIG_FILE"] = self.path
            extra[prefix + "CONFIG_OMITTED"] = ",".join(self.omitted)
        return extra

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
            self.path = None


def plugin_environment(
    base: Mapping[str, str], identity: Mapping[str, str], name: str
) -> dict[str, str]:
    """The parent's environment plus the identity variables and our own few."""
    env = dict(base)
    for key in [k for k in env if k.endswith(("CONFIG_FILE", "CONFIG_OMITTED"))
                and k.startswith(PREFIXES)]:
        del env[key]  # never hand a plugin a stale pointer inherited from our own parent
    env.update(identity)
    env["LMCACHE_PLUGIN_PARENT_PID"] = str(os.getpid())
    env["LMCACHE_PLUGIN_NAME"] = name
    env["PYTHONUNBUFFERED"] = "1"
    return env
