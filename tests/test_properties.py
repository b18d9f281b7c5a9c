"""Property tests (hypothesis): the parsers never fail on odd input, and `list` agrees with `run`.

* ``naming.parse_name`` and ``Target.mismatch`` accept any file name and any identity;
* ``interpreter.parse_shebang`` accepts any first line, and ``command_for`` raises nothing but
  ``InterpreterError`` (and never that for ``.py``/``.sh``, which always have a fallback);
* for generated plugin folders, the plugins `list --json` selects, ``plan().selected`` and the
  plugins that actually ran under ``PluginLauncher.launch_plugins()`` are the same set.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from helpers import CLI, ProcessTracker
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from plugin_launcher import PluginLauncher
from plugin_launcher.interpreter import InterpreterError, command_for, parse_shebang
from plugin_launcher.naming import Target, parse_name

# -------------------------------------------------------------------------------- file names

# Characters a file name may hold (anything but "/" and NUL), weighted towards the ones that
# matter to the naming rule: underscores, dots and (ASCII and non-ASCII) digits.
name_chars = st.one_of(
    st.sampled_from("_._0123456789"),
    st.sampled_from("aAwWsSlL -٣²"),
    st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
)
file_names = st.text(name_chars, min_size=1, max_size=40)
roles = st.one_of(st.sampled_from(["worker", "SCHEDULER", "all", "x1", "worker2"]),
                  st.text(min_size=0, max_size=12))
worker_ids = st.one_of(st.none(), st.integers(min_value=0, max_value=2**70))


@settings(max_examples=300, deadline=None)
@given(file_names, st.lists(file_names, max_size=3), roles, worker_ids)
def test_parse_name_and_mismatch_never_raise(name: str, folders: list[str], role: str,
                                            worker_id: int | None) -> None:
    target = parse_name(name)
    assert isinstance(target, Target)
    assert target.role == target.role.upper()
    assert target.worker_id is None or target.worker_id >= 0
    # folders never change the target: only the base name is read
    assert parse_name("/".join([*folders, name])) == target
    why = target.mismatch(role, worker_id)
    assert why is None or (isinstance(why, str) and why)
    if why is None:
        assert target.role in ("ALL", role.upper())
        assert target.worker_id in (None, worker_id)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["all", "scheduler", "worker", "Worker", "x1"]),
       st.one_of(st.none(), st.integers(min_value=0, max_value=10**30)),
       st.lists(st.text(st.sampled_from("ab_c1 ."), min_size=1, max_size=5), max_size=2),
       st.sampled_from([".sh", ".py"]))
def test_parse_name_reads_what_the_name_says(role: str, worker_id: int | None,
                                             description: list[str], ext: str) -> None:
    parts = [role, *([str(worker_id)] if worker_id is not None else []), *description]
    name = "_".join(parts) + ext
    target = parse_name(name)
    assert target.role == role.upper()
    # a worker ID is only read from a name of three or more parts (as LMCache reads it), and
    # only if it is made of ASCII digits
    segments = "_".join(parts).split("_")
    if len(segments) >= 3 and segments[1].isascii() and segments[1].isdigit():
        assert target.worker_id == int(segments[1])
    else:
        assert target.worker_id is None
    if worker_id is not None:
        assert target.worker_id == (worker_id if description else None)


# --------------------------------------------------------------------------------- shebangs

WORDS = [b"/usr/bin/env", b"env", b"-S", b"-S-u", b"-u", b"-i", b"python3", b"bash", b"sh",
         b"/bin/sh", b"/bin/bash", b"/nonexistent/x", b"/tmp", b"A=1", b"\r", b"\x00", b"\xff",
         b"-", b"--", b"\xc3\xa9", b"", b"/usr/bin/env\x00"]
SEPARATORS = [b" ", b"\t", b"  ", b"", b"\x0b"]


def _shebang(words: list[bytes], seps: list[bytes], end: bytes) -> bytes:
    return b"#!" + b"".join(w + s for w, s in zip(words, seps, strict=False)) + end


structured_lines = st.builds(
    _shebang,
    st.lists(st.sampled_from(WORDS), max_size=6),
    st.lists(st.sampled_from(SEPARATORS), min_size=6, max_size=6),
    st.sampled_from([b"\n", b"\r\n", b"", b"\nrest\n"]),
)
first_lines = st.one_of(st.binary(max_size=300), structured_lines,
                        st.binary(max_size=100).map(lambda b: b"#!" + b))


@settings(max_examples=400, deadline=None)
@given(first_lines)
def test_parse_shebang_never_raises(line: bytes) -> None:
    words = parse_shebang(line)
    if not line.startswith(b"#!"):
        assert words is None
    assert words is None or (isinstance(words, list) and words
                             and all(isinstance(w, str) for w in words))


@settings(max_examples=400, deadline=None)
@given(first_lines, st.sampled_from(["all_x.py", "all_x.sh", "all_x.PY", "all_x.txt", "all_x",
                                     "dir.d/all_x", "all x.sh"]))
def test_command_for_raises_only_interpreter_error(line: bytes, name: str) -> None:
    path = f"/plugins/{name}"
    try:
        command = command_for(path, line)
    except InterpreterError as exc:
        assert path in str(exc)
        assert not name.lower().endswith((".py", ".sh")), "a .py/.sh file always has a fallback"
        return
    assert command.argv[-1] == path
    assert all(isinstance(a, str) for a in command.argv)
    assert shutil.which(command.argv[0]) is not None, command.argv  # runnable as it stands
    assert command.warning is None or path in command.warning


# -------------------------------------------------------------------- list agrees with run

PLUGIN_SH = 'printf "%s\\n" "$LMCACHE_PLUGIN_NAME" >> "$SHARED_FILE"\n'
PLUGIN_PY = ("import os\nwith open(os.environ['SHARED_FILE'], 'a') as f:\n"
             "    f.write(os.environ['LMCACHE_PLUGIN_NAME'] + '\\n')\n")

plugin_names = st.builds(
    lambda hidden, role, wid, desc, ext: ("." if hidden else "") + "_".join(
        [role, *([str(wid)] if wid is not None else []), *([desc] if desc else [])]) + ext,
    st.sampled_from([False, False, False, True]),
    st.sampled_from(["all", "scheduler", "worker", "Worker", "x1"]),
    st.sampled_from([None, None, 0, 1, 12]),
    st.sampled_from(["", "a", "b_c", "d e", "7"]),
    st.sampled_from([".sh", ".py", ".sh", ".py", ".txt"]),
)


def list_selected(folder: str, role: str, worker_id: int | None) -> list[str]:
    args = ["--worker-id", str(worker_id)] if worker_id is not None else []
    out = subprocess.run([*CLI, "list", "--json", "--role", role, "--plugin-location", folder,
                          "--worker-count", "20", *args],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode in (0, 1), out.stderr  # 1: nothing would run
    return sorted(d["name"] for d in json.loads(out.stdout) if d["selected"])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(plugin_names, min_size=1, max_size=6, unique=True),
       st.sampled_from(["worker", "scheduler", "x1"]), st.sampled_from([0, 1, 12]))
def test_list_agrees_with_run(names: list[str], role: str, worker_id: int) -> None:
    tracker = ProcessTracker()
    with tempfile.TemporaryDirectory() as tmp:  # mode 0700, ours: passes the permission check
        folder = Path(tmp) / "plugins"
        folder.mkdir(mode=0o755)
        shared = Path(tmp) / "ran.txt"
        for name in names:
            (folder / name).write_text(PLUGIN_PY if name.endswith(".py") else PLUGIN_SH)
        config = {"plugin_locations": [str(folder)],
                  "plugin_options": {"default": {"stop_timeout": 1}}}
        launcher = PluginLauncher(config, role, worker_id=worker_id, worker_count=20)
        os.environ["SHARED_FILE"] = str(shared)
        try:
            planned = sorted(d.name for d in launcher.plan().selected)
            listed = list_selected(str(folder), role, worker_id)
            launcher.launch_plugins()
            tracker.add(*[p.pid for p in launcher.plugins if p.pid])
            assert launcher.wait(20), "plugins did not end"
            assert all(p.returncode == 0 for p in launcher.plugins), launcher.status()
        finally:
            launcher.stop_plugins(timeout=1)
            del os.environ["SHARED_FILE"]
            tracker.cleanup()
        ran = sorted(shared.read_text().splitlines()) if shared.exists() else []
    event(f"{len(planned)} of {len(names)} selected")
    assert listed == planned
    assert ran == planned  # each selected plugin ran exactly once, and nothing else ran
    for name in names:  # the naming rule, independently: hidden and .txt files never run
        if name.startswith(".") or name.endswith(".txt"):
            assert name not in ran
