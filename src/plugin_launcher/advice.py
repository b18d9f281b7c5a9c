"""One clear line per operator mistake: near-miss keys, roles and plugin names, CRLF scripts.

Pure rules (table-tested) plus one small file read; the CLI and the planner print what they
return.  Unknown configuration keys stay legal (an LMCache config has many keys of its own): only a
near miss of one of *our* keys is worth a warning.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from typing import Any

from .naming import ALL_ROLES, parse_name

CONFIG_KEYS = (
    "plugin_locations",
    "runtime_plugin_locations",
    "extra_config",
    "plugin_options",
    "allow_insecure_plugins",
    "watch_plugins",
)
BUILTIN_ROLES = ("SCHEDULER", "WORKER")
CUTOFF = 0.75
CRLF_HEAD = 1 << 16


def did_you_mean(word: str, choices: Iterable[str], cutoff: float = CUTOFF) -> str | None:
    """The closest of ``choices`` to ``word`` (case-insensitive), or None if none is close."""
    by_folded: dict[str, str] = {}
    for choice in choices:
        by_folded.setdefault(choice.casefold(), choice)
    folded = word.casefold()
    if folded in by_folded:
        return None  # not a near miss: the same word
    import difflib  # only when something is misspelt: not on every start

    found = difflib.get_close_matches(folded, list(by_folded), n=1, cutoff=cutoff)
    return by_folded[found[0]] if found else None


def config_key_warnings(data: Mapping[str, Any], source: str) -> list[str]:
    """A warning for each top-level key that looks like a misspelling of one of ours."""
    warnings = []
    for key in data:
        if not isinstance(key, str) or key in CONFIG_KEYS:
            continue
        near = did_you_mean(key, CONFIG_KEYS)
        if near is not None:
            warnings.append(f"{source}: unknown key {key!r} (kept and passed to plugins); "
                            f"did you mean {near}?")
    return warnings


def option_name_warnings(option_names: Iterable[str], plugin_names: Iterable[str]) -> list[str]:
    """A warning for each ``plugin_options`` entry that names no discovered plugin."""
    known = list(plugin_names)
    present = set(known)
    warnings = []
    for name in option_names:
        if name in present:
            continue
        near = did_you_mean(name, known)
        hint = f"; did you mean {near}?" if near is not None else ""
        warnings.append(f"plugin_options.{name}: no plugin named {name!r} was found{hint}")
    return warnings


def known_roles(plugin_names: Iterable[str]) -> list[str]:
    """SCHEDULER, WORKER and every role a plugin file name targets (upper case, sorted)."""
    roles = set(BUILTIN_ROLES)
    for name in plugin_names:
        role = parse_name(name).role
        if role and role != ALL_ROLES:
            roles.add(role)
    return sorted(roles)


def role_advice(given: str, plugin_names: Iterable[str]) -> tuple[str | None, str | None]:
    """(error, warning) about ``--role given``: an error for a near miss of a known role that no
    file targets, a warning for any other role that no file names (only ``all_*`` apply)."""
    role = given.upper()
    roles = known_roles(plugin_names)
    if role in roles:
        return None, None
    near = did_you_mean(role, roles)
    if near is not None:
        return (f"--role {given}: no plugin targets role {role}; "
                f"did you mean {near.lower()}?"), None
    return None, (f"--role {given}: no plugin file names role {role}, only all_* plugins apply "
                  f"(roles named: {', '.join(roles)})")


def crlf_problem(path: str, head: bytes) -> str | None:
    """Why a script with this beginning would fail on Windows line endings, or None."""
    first_line = head.split(b"\n", 1)[0]
    if path.lower().endswith(".sh") and b"\r\n" in head:
        return (f"{path}: has Windows (CRLF) line endings; bash will see '\\r' at the end of each "
                "line; convert it with dos2unix")
    if first_line.startswith(b"#!") and first_line.endswith(b"\r"):
        return (f"{path}: has Windows (CRLF) line endings (its shebang line ends in '\\r'); "
                "convert it with dos2unix")
    return None


def crlf_warning(path: str) -> str | None:
    """``crlf_problem`` on the first 64 KiB of ``path``; None if it cannot be read (or is no
    longer a regular file: never block on a FIFO swapped in since the walk)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            head = f.read(CRLF_HEAD)
    except OSError:
        return None
    return crlf_problem(path, head)


def describe_path(location: str) -> str:
    """``location``, followed by the absolute path it resolves to when that differs."""
    absolute = os.path.abspath(location)
    return location if absolute == location else f"{location} (resolved to {absolute})"
