"""The LMCache face: drop-in replacements for LMCache's own plugin launchers, of every release.

LMCache constructs its launcher positionally as ``(config, role, worker_count, worker_id)``:
``RuntimePluginLauncher`` in 0.4 and later (``lmcache/v1/plugin/runtime_plugin_launcher.py``),
``PluginLauncher`` up to 0.3 (``lmcache/v1/plugin/plugin_launcher.py``).  The classes here take
exactly what LMCache passes, never raise into it (an exception while LMCache builds its launcher
turns its KV cache off), give plugins the variables that release gave them, and log plugin lines
where LMCache logged them.  :func:`install` puts them in place of LMCache's classes.
"""

from __future__ import annotations

import enum
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import lmcache_hook
from .discovery import PLUGIN_EXTENSIONS
from .launcher import PluginLauncher as CorePluginLauncher
from .naming import parse_name
from .output import LoggingSink

log = logging.getLogger("plugin_launcher.lmcache")

RUNTIME_MODULE = lmcache_hook.RUNTIME_MODULE
LEGACY_MODULE = lmcache_hook.LEGACY_MODULE
STOP_BUDGET = 10.0  # LMCache's shutdown gives stop_plugins 10 s (`_safe_close(..., 10.0)`)
STOP_GRACE_MAX = 4.0  # + at most ~5 s if the loop were stuck (launcher.stop_plugins)
STOP_MARGIN = 2.0


# ------------------------------------------------------------------------------------- values
def role_values(role: Any) -> tuple[str | None, str, str | None]:
    """(role to select by, the name as given, error) for whatever LMCache passes as a role.

    ``None`` (the MP server): no role, every file runs.  An Enum (vLLM's ``KVConnectorRole`` in
    LMCache 0.3): its ``.name``.  A string: as it is, matched case-insensitively.
    """
    if role is None:
        return None, "", None
    if isinstance(role, enum.Enum):
        name = str(role.name)
    elif isinstance(role, str):
        name = role
    else:
        return "", str(role), f"role {role!r} is not a string, an Enum or None"
    text = name.strip()
    if not text:
        return "", name, f"role {role!r} is empty"
    if "_" in text or "/" in text or any(c.isspace() for c in text):
        return "", name, (f"role {role!r} cannot match any file name (it contains '_', '/' or "
                          "a space)")
    return text.upper(), name, None


def worker_id_value(worker_id: Any) -> tuple[int | None, str | None]:
    """-1 and None: no worker (LMCache's scheduler); any integer >= 0 is a worker ID, even one
    past the worker count (pipeline parallelism gives those)."""
    if worker_id is None or (type(worker_id) is int and worker_id == -1):
        return None, None
    if isinstance(worker_id, bool) or not isinstance(worker_id, int) or worker_id < -1:
        return None, f"worker_id {worker_id!r} is not an integer >= -1"
    return int(worker_id), None


def worker_count_value(worker_count: Any) -> tuple[int, str | None]:
    if worker_count is None:
        return 1, None
    if isinstance(worker_count, bool) or not isinstance(worker_count, int) or worker_count < 1:
        return 1, f"worker_count {worker_count!r} is not an integer >= 1"
    return int(worker_count), None


# ------------------------------------------------------------------------- LMCache's selection
def lmcache_would_run(file_name: str, role: str | None, worker_id: int | None) -> bool:
    """LMCache's ``_should_skip_plugin``, negated (0.3 and 0.5 read names the same way)."""
    parts = Path(file_name).stem.lower().split("_")
    if len(parts) < 2 or role is None:
        return True
    if parts[0].upper() not in ("ALL", role.upper()):
        return False
    if len(parts) > 2 and parts[1].isdigit():
        try:
            return int(parts[1]) == (-1 if worker_id is None else worker_id)
        except ValueError:  # a digit int() refuses ('²'): LMCache's launch fails, logged
            return False
    return True


def lmcache_selection(locations: Iterable[str], role: str | None,
                      worker_id: int | None) -> list[str]:
    """The files LMCache's own launcher would start: its walk (``rglob``, which includes hidden
    files and does not enter symlinked folders) and its name rule."""
    chosen: list[str] = []
    for loc in locations:
        path = Path(loc)
        try:
            if path.is_file():
                files = [path]
            elif path.is_dir():
                files = [*path.rglob("*.py"), *path.rglob("*.sh")]
            else:
                continue
        except OSError:
            continue
        chosen.extend(str(f) for f in files if lmcache_would_run(f.name, role, worker_id))
    return chosen


def _key(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def _hidden_part(name: str) -> str | None:
    for part in Path(name).parts:
        if part.startswith(".") or part == "__pycache__":
            return part
    return None


def _rename_hint(file_name: str) -> str:
    return f"all_{file_name}"


def selection_differences(
    launcher: CorePluginLauncher, role_given: str
) -> list[str]:
    """One warning per file that LMCache would run here and we do not, or the other way round."""
    plan = launcher.plan()
    ours = {_key(d.path): d for d in plan.decisions}
    selected = {k for k, d in ours.items() if d.selected}
    theirs: dict[str, str] = {}
    for path in lmcache_selection(launcher.config.plugin_locations, launcher.role,
                                  launcher.worker_id):
        theirs.setdefault(_key(path), path)
    worker = "none" if launcher.worker_id is None else launcher.worker_id
    where = f"role {role_given or 'None'}, worker {worker}"
    roots = [_key(loc) for loc in launcher.config.plugin_locations]
    warnings: list[str] = []
    for key, path in theirs.items():
        if key in selected:
            continue
        decision = ours.get(key)
        base = os.path.basename(path)
        if decision is None:
            root = next((r for r in roots if key.startswith(r + os.sep)), os.path.dirname(key))
            hidden = _hidden_part(os.path.relpath(key, root))
            if hidden is not None:
                why = f"it is under '{hidden}', which plugin-launcher skips"
                fix = "move it out of the hidden or __pycache__ folder"
            elif not os.path.isfile(path):
                why = "it is not a regular file"
                fix = "make it a regular file"
            else:
                why = "plugin-launcher did not find it"
                fix = "check its location"
            warnings.append(f"{path}: not run here ({where}): {why}; LMCache ran it; {fix}")
        elif decision.reason.startswith("refused"):
            warnings.append(f"{path}: not run here ({where}): {decision.reason}; LMCache ran it; "
                            "fix its permissions or set allow_insecure_plugins")
        elif "_" not in Path(base).stem:
            target = parse_name(decision.name)
            warnings.append(
                f"{base} targets role {target.role}, which this process ({where}) does not "
                f"have; LMCache ran a name without '_' on every role; rename it "
                f"{_rename_hint(base)} to run it everywhere")
        else:
            warnings.append(f"{path}: not run here ({where}): {decision.reason}; LMCache ran it")
    for key in sorted(selected - set(theirs)):
        decision = ours[key]
        base = os.path.basename(decision.path)
        if not base.endswith(PLUGIN_EXTENSIONS):
            why = "LMCache only ran lower-case .py and .sh files"
        elif any(os.path.islink(p) for p in _parents(decision.path, decision.name)):
            why = "LMCache did not enter symlinked folders"
        else:
            why = "LMCache would not have run it"
        warnings.append(f"{decision.path}: runs here ({where}) although {why}")
    return warnings


def _parents(path: str, name: str) -> list[str]:
    parents = []
    head = os.path.dirname(path)
    for _ in range(name.count(os.sep)):
        parents.append(head)
        head = os.path.dirname(head)
    return parents


# ------------------------------------------------------------------------------------ the face
def _lmcache_logger(module: str) -> logging.Logger | None:
    """LMCache's own logger for its launcher module, when LMCache has set it up."""
    logger = logging.getLogger(module)
    return logger if logger.handlers else None


class _ForwardToLMCache(logging.Handler):
    """Hands the launcher's own records to LMCache's logger (its format, its stream)."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= self.target.getEffectiveLevel():
            self.target.handle(record)


class _LMCacheFace(CorePluginLauncher):
    """Shared by both eras; subclasses say which module, and which variable values, they mimic."""

    lmcache_module = RUNTIME_MODULE
    upper_case_role = False

    def __init__(self, config: Any, role: Any = None, worker_count: Any = 1,
                 worker_id: Any = -1, *args: Any, **kwargs: Any) -> None:
        # LMCache's own attributes, as it set them.
        self.lmcache_config = config
        self.lmcache_role = role
        self.lmcache_worker_count = worker_count
        self.lmcache_worker_id = worker_id
        errors: list[str] = []
        if args or kwargs:
            errors.append(f"ignoring unexpected arguments {args!r} {kwargs!r}")
        select_role, self._role_given, error = role_values(role)
        errors += [error] if error else []
        wid, error = worker_id_value(worker_id)
        errors += [error] if error else []
        count, error = worker_count_value(worker_count)
        errors += [error] if error else []
        target = _lmcache_logger(self.lmcache_module)
        sink = LoggingSink(target) if target is not None else LoggingSink()
        self._forward: _ForwardToLMCache | None = None
        if target is not None and not logging.getLogger("plugin_launcher").hasHandlers():
            self._forward = _ForwardToLMCache(target)
            ours = logging.getLogger("plugin_launcher")
            ours.addHandler(self._forward)
            if ours.level == logging.NOTSET:
                ours.setLevel(logging.INFO)
        try:
            super().__init__(config, None, worker_id=wid, worker_count=count, sink=sink)
        except Exception as exc:  # never into LMCache: run nothing, say why once
            errors.append(f"cannot read the configuration ({type(exc).__name__}: {exc}); "
                          "no plugin will run")
            super().__init__({}, None, worker_id=wid, worker_count=count, sink=sink)
            self._broken = True
        else:
            self._broken = False
        # role_values has already checked and upper-cased it; "" matches only all_* names
        self.role = select_role
        for error in errors:
            log.error("plugin-launcher (LMCache drop-in): %s", error)

    # LMCache's attribute names ------------------------------------------------------------
    @property
    def plugin_processes(self) -> list[Any]:
        """The live ``subprocess.Popen`` of each plugin, as LMCache kept them."""
        return [p.run.popen for p in self.plugins if p.run is not None]

    def identity_environment(self) -> dict[str, str]:
        from .environment import identity_variables

        if self.upper_case_role:
            role = (self.role or "") if self.role is not None else ""
        else:
            role = self._role_given
        worker_id = self.lmcache_worker_id
        wid = "-1" if worker_id is None else str(worker_id)
        return identity_variables(role, wid, str(self.lmcache_worker_count),
                                  self._handoff.inline)

    def launch_plugins(self) -> list[Any]:
        """Start the plugins; never raises (LMCache would lose its cache over it)."""
        if self._broken:
            return []
        try:
            if self.config.plugin_locations:
                for warning in selection_differences(self, self._role_given):
                    log.warning("%s", warning)
            return super().launch_plugins()
        except Exception as exc:
            log.error("plugin-launcher (LMCache drop-in): cannot launch plugins: %s: %s",
                      type(exc).__name__, exc)
            return []

    def stop_plugins(self, timeout: float | None = None, *,
                     margin: float = STOP_MARGIN) -> None:
        """Within LMCache's 10 s shutdown budget, whatever the plugins do; never raises."""
        try:
            grace = STOP_GRACE_MAX if timeout is None else max(0.0, min(timeout, STOP_GRACE_MAX))
            super().stop_plugins(grace, margin=min(margin, STOP_BUDGET - grace - 1.0))
        except Exception as exc:
            try:
                log.error("plugin-launcher (LMCache drop-in): stopping plugins: %s: %s",
                          type(exc).__name__, exc)
            except Exception:
                pass  # at interpreter exit even logging may be gone
        finally:
            if self._forward is not None:
                logging.getLogger("plugin_launcher").removeHandler(self._forward)
                self._forward = None


class RuntimePluginLauncher(_LMCacheFace):
    """LMCache 0.4+: ``RuntimePluginLauncher(config, role, worker_count, worker_id)``.

    Plugins get ``LMCACHE_RUNTIME_PLUGIN_*`` and ``LMCACHE_PLUGIN_*`` with the values 0.4+ gives:
    the role as passed (``"worker"``; ``""`` for the MP server's None).
    """

    lmcache_module = RUNTIME_MODULE
    upper_case_role = False


class PluginLauncher(_LMCacheFace):
    """LMCache 0.3 and earlier: ``PluginLauncher(config, role, worker_count, worker_id)``.

    Plugins get the role upper-case (``WORKER``), as LMCache's documentation promised; 0.3.10
    actually passed ``str(KVConnectorRole.WORKER)``, i.e. ``KVConnectorRole.WORKER``.
    """

    lmcache_module = LEGACY_MODULE
    upper_case_role = True


REPLACEMENTS: dict[str, tuple[str, type[_LMCacheFace]]] = {
    RUNTIME_MODULE: ("RuntimePluginLauncher", RuntimePluginLauncher),
    LEGACY_MODULE: ("PluginLauncher", PluginLauncher),
}


def install() -> None:
    """Put the drop-in in place of LMCache's launcher in every LMCache module that holds it, now
    and for modules imported later.  Idempotent; :func:`uninstall` undoes it."""
    lmcache_hook.install(REPLACEMENTS)


def uninstall() -> None:
    """Give LMCache its own launcher classes back."""
    lmcache_hook.uninstall()


def installed() -> bool:
    return lmcache_hook.installed()


USAGE = """\
usage: plugin-launcher-lmcache COMMAND [ARG]...
       plugin-launcher-lmcache --pythonpath

Runs COMMAND with plugin-launcher in place of LMCache's plugin launcher in every
Python process it starts (through PYTHONPATH and a chained sitecustomize).
Without a wrapper: PYTHONPATH=$(plugin-launcher-lmcache --pythonpath) COMMAND

example:
  plugin-launcher-lmcache vllm serve Qwen/Qwen3-8B --kv-transfer-config '{...}'"""


def main(argv: list[str] | None = None) -> int:
    """``plugin-launcher-lmcache COMMAND [ARG]...``: run COMMAND (e.g. ``vllm serve ...``) with
    the drop-in installed in every Python process it starts, with no edit of any file."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--pythonpath"]:
        print(lmcache_hook.bootstrap_pythonpath(os.environ.get("PYTHONPATH", "")))
        return 0
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    env = dict(os.environ)
    env["PYTHONPATH"] = lmcache_hook.bootstrap_pythonpath(env.get("PYTHONPATH", ""))
    try:
        os.execvpe(args[0], args, env)
    except OSError as exc:
        print(f"error: cannot run {args[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
