"""Which command line runs a plugin file.

We read the shebang ourselves instead of exec'ing the file: plugin files need not be executable,
and a missing interpreter must fall back (with a warning) rather than fail.  Arguments are kept as
the kernel would pass them, except that we split them on whitespace like ``env -S`` does, which is
what every author of ``#!/bin/bash -e`` or ``#!/usr/bin/env -S python3 -u`` means.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

FALLBACKS = {".py": "python", ".sh": "bash"}
MAX_SHEBANG = 4096


class InterpreterError(ValueError):
    """The file cannot be run: no usable shebang and no fallback for its extension."""


@dataclass(frozen=True)
class Command:
    argv: list[str]
    warning: str | None = None


def parse_shebang(first_line: bytes) -> list[str] | None:
    """The interpreter and its arguments from a first line, or None if it is not a shebang."""
    if not first_line.startswith(b"#!"):
        return None
    try:
        text = first_line[2:].split(b"\n", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        return None
    words = text.replace("\r", " ").split()
    if not words:
        return None
    # `#!/usr/bin/env -S prog args` and `#!/usr/bin/env prog`: resolve env ourselves so a missing
    # program is detected (and falls back) instead of failing inside the plugin.
    if os.path.basename(words[0]) == "env":
        rest = words[1:]
        if rest[:1] == ["-S"]:
            rest = rest[1:]
        elif rest[:1] and rest[0].startswith("-S"):
            rest = [rest[0][2:], *rest[1:]]
        if not rest:
            return ["env", ""]  # `#!/usr/bin/env` alone names no program: fall back
        if not rest[0].startswith("-") and "=" not in rest[0]:
            return ["env", *rest]
    return words


def _fallback(path: str) -> list[str]:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".py":
        return [sys.executable]
    if ext == ".sh":
        return ["bash"]
    raise InterpreterError(f"{path}: no shebang line and no interpreter for extension {ext!r}")


def _resolve(program: str) -> str | None:
    if "\0" in program:
        return None
    if "/" in program:
        return program if os.access(program, os.X_OK) and os.path.isfile(program) else None
    return shutil.which(program)


def command_for(path: str, first_line: bytes) -> Command:
    """The argv that runs ``path`` given its first line (read by the caller)."""
    shebang = parse_shebang(first_line)
    if shebang is None:
        return Command([*_fallback(path), path])
    if shebang[0] == "env":
        program, args = shebang[1], shebang[2:]
        found = _resolve(program) if program else None
        if found is not None:
            return Command([found, *args, path])
        missing = program
    else:
        found = _resolve(shebang[0])
        if found is not None:
            return Command([*shebang, path])
        missing = shebang[0]
    try:
        fallback = [*_fallback(path), path]
    except InterpreterError:
        raise InterpreterError(f"{path}: interpreter {missing!r} not found") from None
    return Command(fallback, f"{path}: interpreter {missing!r} not found, using {fallback[0]}")


def read_first_line(path: str) -> bytes:
    """The first line of a file, at most MAX_SHEBANG bytes (the kernel reads even less)."""
    with open(path, "rb") as f:
        return f.readline(MAX_SHEBANG)
