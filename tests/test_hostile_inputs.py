"""Hostile and broken inputs: one table, each case the exact result a user sees.

Every case builds a plugin folder (and maybe a config file or environment), runs
``python -m plugin_launcher run`` (or ``list``) with ``--stop-timeout 1``, and checks what the user
would notice: which plugins were started (the ``started plugin NAME (pid N)`` log lines, compared
as a sorted list so a plugin started twice is caught), the plugin lines on stdout, the launcher's
own messages on stderr, the exit code, and that no started plugin is left running afterwards.  The
launcher must never log an internal error or a traceback, whatever the input.

A few cases cannot be set up from outside the CLI and use the Python API with the same checks
(``runner=``); one drops the capabilities that let root read every folder (``setpriv``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import CLI, PYTHON, ProcessTracker, alive, safe_dir, wait_for, wait_gone

from plugin_launcher import PluginLauncher

LOG_LINE = re.compile(r"^\S+ \S+ plugin-launcher (DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)$")
STARTED = re.compile(r"^started plugin (.+) \(pid (\d+)\)")
GARBAGE = b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4
BIG = 10_000_000  # "a 10 MB single line": 152 pieces of 64 KiB and one of 38,528 bytes
PIECE = 64 * 1024
WORKER30 = "123456789012345678901234567890"
LONG_NAME = "all_" + "x" * 248 + ".sh"  # 255 bytes: the longest name a Linux file system allows
DEEP = "/".join(["d"] * 60) + "/all_deep.sh"


@dataclass
class Ctx:
    """One case's world: its folders, the tracker, and what the run showed."""

    tmp: Path
    dir: Path  # the plugin location (safe: owned by root, mode 0755)
    tracker: ProcessTracker
    extra: dict[str, Any] = field(default_factory=dict)

    def sub(self, text: str) -> str:
        return (text.replace("{dir}", str(self.dir)).replace("{tmp}", str(self.tmp))
                .replace("{python}", PYTHON))


@dataclass
class Outcome:
    code: int | None
    stdout: list[str]  # plugin lines, split on "\n" only ("\r" is data)
    logs: list[tuple[str, str]]  # (LEVEL, message) of the launcher's own lines
    stderr: str
    elapsed: float

    @property
    def started(self) -> list[str]:
        return sorted(m.group(1) for _, msg in self.logs if (m := STARTED.match(msg)))

    @property
    def pids(self) -> list[int]:
        return [int(m.group(2)) for _, msg in self.logs if (m := STARTED.match(msg))]

    def messages(self, level: str | None = None) -> list[str]:
        return [msg for lvl, msg in self.logs if level is None or lvl == level]


@dataclass
class Case:
    id: str
    files: dict[str, str | bytes] = field(default_factory=dict)  # name -> content, mode 0755
    setup: Callable[[Ctx], None] | None = None
    action: str = "run"  # run | list (list always with --json)
    args: list[str] = field(default_factory=lambda: ["--plugin-location", "{dir}"])
    role: str = "worker"
    env: dict[str, str] = field(default_factory=dict)
    interact: Callable[[Ctx, subprocess.Popen[bytes]], None] | None = None
    runner: Callable[[Ctx, Case], Outcome] | None = None  # instead of the CLI
    code: int | None = 0
    started: list[str] | None = None  # exact, sorted (run)
    selected: list[str] | None = None  # exact, sorted (list --json)
    reasons: dict[str, str] = field(default_factory=dict)  # list --json: name -> reason
    stdout: list[str] | None = None  # exact plugin lines, order-insensitive
    stdout_has: list[str] = field(default_factory=list)  # lines that must be among them
    logs: list[str] = field(default_factory=list)  # each a substring of some launcher line
    error: str | None = None  # the exact `error: ...` line of a usage error (exit 2)
    check: Callable[[Ctx, Outcome], None] | None = None
    seconds: float = 20.0  # the CLI is killed (and the case fails) after this
    xfail: str | None = None  # a known core bug (reason)


def log_has(out: Outcome, text: str) -> bool:
    return any(text in msg for msg in out.messages())


# ----------------------------------------------------------------------------------- runners


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    env.update(extra)
    return env


def parse_stderr(err: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for line in err.splitlines() if (m := LOG_LINE.match(line))]


def run_cli(ctx: Ctx, case: Case, prefix: tuple[str, ...] = ()) -> Outcome:
    args = [ctx.sub(a) for a in case.args]
    argv = [*prefix, *CLI, case.action, "--role", case.role, *args]
    argv += ["--json"] if case.action == "list" else ["--stop-timeout", "1"]
    out_path, err_path = ctx.tmp / "cli.stdout", ctx.tmp / "cli.stderr"
    ctx.extra["stderr_path"] = err_path
    ctx.extra["stdout_path"] = out_path
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.monotonic()
        proc = ctx.tracker.popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                 cwd=ctx.tmp, env=clean_env({k: ctx.sub(v)
                                                             for k, v in case.env.items()}))
        if case.interact is not None:
            case.interact(ctx, proc)
        try:
            proc.wait(timeout=case.seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{case.action} did not finish within {case.seconds}s; stderr:\n"
                                 + err_path.read_text(errors="replace")) from None
        elapsed = time.monotonic() - start
    stderr = err_path.read_bytes().decode("utf-8", "replace")
    stdout = out_path.read_bytes().decode("utf-8", "replace").split("\n")[:-1]
    return Outcome(proc.returncode, stdout, parse_stderr(stderr), stderr, elapsed)


class ListSink:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, name: str, stream: str, block: bytes, pid: int | None = None) -> None:
        for line in block.decode("utf-8", "replace").split("\n")[:-1]:
            self.lines.append(f"[{name}] {line}")


class Records:
    """Collects the launcher's log records as (LEVEL, message)."""

    def __init__(self) -> None:
        import logging

        self.items: list[tuple[str, str]] = []
        handler = logging.Handler()
        handler.emit = lambda r: self.items.append((r.levelname, r.getMessage()))  # type: ignore
        self.handler = handler
        self.logger = logging.getLogger("plugin_launcher")
        self.level = self.logger.level

    def __enter__(self) -> Records:
        import logging

        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)


def run_api_deleting(victim: str) -> Callable[[Ctx, Case], Outcome]:
    """Plan, delete ``victim``, then launch that plan: the file vanished between the two."""

    def runner(ctx: Ctx, case: Case) -> Outcome:
        sink = ListSink()
        config = {"plugin_locations": [str(ctx.dir)],
                  "plugin_options": {"default": {"stop_timeout": 1}}}
        launcher = PluginLauncher(config, "worker", worker_id=0, worker_count=1, sink=sink)
        start = time.monotonic()
        with Records() as records:
            plan = launcher.plan()
            assert victim in [d.name for d in plan.selected]
            (ctx.dir / victim).unlink()
            launcher.plan = lambda: plan  # type: ignore[method-assign]
            try:
                launcher.launch_plugins()
                ctx.tracker.add(*[p.pid for p in launcher.plugins if p.pid])
                assert launcher.wait(15), "plugins did not end"
                code = 1 if any(p.last_failure for p in launcher.plugins) else 0
            finally:
                launcher.stop_plugins(timeout=1)
        return Outcome(code, sink.lines, records.items, "", time.monotonic() - start)

    return runner


def run_without_dac_caps(ctx: Ctx, case: Case) -> Outcome:
    """Root reads every folder; drop CAP_DAC_OVERRIDE/READ_SEARCH so mode 000 means unreadable."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs setpriv (util-linux) to run the launcher without root's read bypass")
    prefix = (setpriv, "--bounding-set", "-dac_override,-dac_read_search")
    probe = subprocess.run([*prefix, "ls", str(ctx.dir / "locked")], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("cannot make a folder unreadable for the launcher here")
    return run_cli(ctx, case, prefix)


# ------------------------------------------------------------------------------- setups/checks


def sh(text: str) -> str:
    return "#!/bin/sh\n" + text + "\n"


def py(text: str) -> str:
    return "import sys, os, time\n" + text + "\n"


def make_fifo(ctx: Ctx) -> None:
    os.mkfifo(ctx.dir / "all_fifo.sh", 0o644)


def fifo_not_selected(ctx: Ctx, out: Outcome) -> None:
    decisions = {d["name"]: d for d in json.loads("\n".join(out.stdout))}
    assert decisions["all_ok.sh"]["selected"]
    assert "all_fifo.sh" not in decisions or not decisions["all_fifo.sh"]["selected"]


def many_files(ctx: Ctx) -> None:
    folder = safe_dir(ctx.dir / "crowd")
    for i in range(5000):
        (folder / f"notes_{i:05d}.txt").write_bytes(b"")
    for i in range(4998):
        (folder / f"scheduler_{i}_x.sh").write_bytes(b"exit 3\n")


def unreadable_folder(ctx: Ctx) -> None:
    locked = safe_dir(ctx.dir / "locked")
    (locked / "all_secret.sh").write_text("echo secret\n")
    locked.chmod(0)


def symlink_loop(ctx: Ctx) -> None:
    (ctx.dir / "loop").symlink_to(".")
    (ctx.dir / "sub").mkdir(mode=0o755)
    (ctx.dir / "sub" / "up").symlink_to("..")


def broken_symlink(ctx: Ctx) -> None:
    (ctx.dir / "all_broken.sh").symlink_to("/nonexistent/plugin.sh")


def alias_location(ctx: Ctx) -> None:
    (ctx.tmp / "alias").symlink_to(ctx.dir)
    (ctx.tmp / "dup.yaml").write_text(f"plugin_locations: ['{ctx.dir}', '{ctx.tmp}/alias']\n")


def config_file(text: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        (ctx.tmp / "lmcache.yaml").write_text(ctx.sub(text))

    return setup


def not_executable_interpreter(ctx: Ctx) -> None:
    path = ctx.tmp / "notexec"
    path.write_text("#!/bin/sh\necho wrong\n")
    path.chmod(0o644)


def check_big_line(ctx: Ctx, out: Outcome) -> None:
    prefix = "[all_big.py] "
    assert all(line.startswith(prefix) for line in out.stdout)
    pieces = [line[len(prefix):] for line in out.stdout]
    assert [len(p) for p in pieces] == [PIECE] * (BIG // PIECE) + [BIG % PIECE]
    assert "".join(pieces) == "x" * BIG  # every byte, in order, nothing added


def check_cr_flood(ctx: Ctx, out: Outcome) -> None:
    pieces = [line.removeprefix("[all_cr.py] ") for line in out.stdout]
    assert [len(p) for p in pieces] == [PIECE, PIECE, PIECE, 200_000 - 3 * PIECE]
    assert "".join(pieces) == "\r" * 200_000


def plugin_pid(ctx: Ctx, name: str) -> int:
    """The PID from the `started plugin NAME (pid N)` line, once it appears."""
    path: Path = ctx.extra["stderr_path"]

    def find() -> int | None:
        for _, msg in parse_stderr(path.read_bytes().decode("utf-8", "replace")):
            m = STARTED.match(msg)
            if m and m.group(1) == name:
                return int(m.group(2))
        return None

    pid: int = wait_for(find, 10, message=f"{name} to start")
    ctx.tracker.add(pid)
    return pid


def keeps_running_then_sigterm(name: str, line: str | None) -> Callable[[Ctx, Any], None]:
    """The plugin closed its output and runs on: still supervised, ended by the CLI's SIGTERM."""

    def interact(ctx: Ctx, proc: subprocess.Popen[bytes]) -> None:
        pid = plugin_pid(ctx, name)
        if line is not None:
            out: Path = ctx.extra["stdout_path"]
            wait_for(lambda: line in out.read_bytes().decode(errors="replace"), 10,
                     message=f"{line!r} on stdout")
        time.sleep(1.0)  # on purpose: its streams are closed, yet it is not taken for ended
        assert alive(pid), f"{name} ended by itself"
        assert proc.poll() is None, "the launcher exited while the plugin still runs"
        proc.send_signal(signal.SIGTERM)
        ctx.extra["pid"] = pid

    return interact


def check_stopped(ctx: Ctx, out: Outcome) -> None:
    assert not alive(ctx.extra["pid"])


def daemon_check(ctx: Ctx, out: Outcome) -> None:
    """A plugin that double-forks and calls setsid() leaves its process group and session.
    Where cgroups are writable the daemon stays in the plugin's cgroup and is ended when the
    plugin exits; with session-ID containment it is out of reach (documented), and survives."""
    from plugin_launcher.containment import Containment

    found = Containment.detect()
    contained = bool(found.roots)
    found.close()
    pid_file = ctx.tmp / "daemon.pid"
    pid = wait_for(lambda: pid_file.read_text().strip() if pid_file.exists() else None, 5)
    daemon = int(pid)
    ctx.tracker.add(daemon)
    (plugin,) = out.pids
    assert daemon not in out.pids
    if contained:
        wait_gone([daemon], 5)
        return
    try:
        assert alive(daemon), "the daemon did not survive (then it is no longer out of reach)"
        assert os.getsid(daemon) != plugin and os.getpgid(daemon) != plugin  # escaped
    finally:
        os.kill(daemon, signal.SIGKILL)
        wait_gone([daemon], 5)


DAEMON = py("""
pid_file = os.path.join(os.environ["TMP_DIR"], "daemon.pid")
if os.fork():
    # like a real daemon's parent, exit once the daemon is set up (else the launcher would end
    # the half-made daemon with the plugin's process group, which is a race, not this case)
    while not os.path.exists(pid_file):
        time.sleep(0.01)
    print("parent exits"); sys.exit(0)
os.setsid()
if os.fork():
    os._exit(0)
{redirect}
with open(os.path.join(os.environ["TMP_DIR"], "daemon.pid.tmp"), "w") as f:
    f.write(str(os.getpid()))
os.rename(os.path.join(os.environ["TMP_DIR"], "daemon.pid.tmp"), pid_file)
time.sleep(60)
""")
REDIRECT = """
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
"""


def check_config_values(ctx: Ctx, out: Outcome) -> None:
    (line,) = out.stdout
    seen = json.loads(line.removeprefix("[all_cfg.py] "))
    assert seen == {"my_custom": {"nested": [1, 2], "deep": {"k": "v"}}, "top": 7,
                    "extra_config": {"port": 9}}


def check_non_utf8_name(ctx: Ctx, out: Outcome) -> None:
    (line,) = out.stdout
    assert line.startswith("[all_") and line.endswith("] hi"), line


def check_fast(seconds: float) -> Callable[[Ctx, Outcome], None]:
    def check(ctx: Ctx, out: Outcome) -> None:
        assert out.elapsed < seconds, f"took {out.elapsed:.1f}s"

    return check


# ------------------------------------------------------------------------------------ the table

CASES = [
    # --- empty and binary files
    Case("empty-sh", files={"all_empty.sh": ""}, started=["all_empty.sh"], stdout=[],
         logs=["plugin all_empty.sh exited with code 0"]),
    Case("empty-py", files={"all_empty.py": ""}, started=["all_empty.py"], stdout=[],
         logs=["plugin all_empty.py exited with code 0"]),
    Case("binary-sh-fails-others-unaffected",
         files={"all_bin.sh": GARBAGE, "all_ok.sh": sh("echo ok")}, code=1,
         started=["all_bin.sh", "all_ok.sh"],
         stdout=["[all_bin.sh] {dir}/all_bin.sh: {dir}/all_bin.sh: cannot execute binary file",
                 "[all_ok.sh] ok"],
         logs=["plugin all_bin.sh exited with code 126", "plugin all_ok.sh exited with code 0"]),
    Case("binary-py-fails-others-unaffected",
         files={"all_bin.py": GARBAGE, "all_ok.sh": sh("echo ok")}, code=1,
         started=["all_bin.py", "all_ok.sh"],
         stdout_has=["[all_ok.sh] ok"],  # Python's SyntaxError text varies by version
         logs=["plugin all_bin.py exited with code 1", "plugin all_ok.sh exited with code 0"]),
    Case("undecodable-shebang-falls-back-to-bash",
         files={"all_odd.sh": b"#!\xff\xfe\x80 not utf-8\necho after\n"},
         started=["all_odd.sh"], stdout=["[all_odd.sh] after"]),
    # --- output that is hard to handle
    Case("10MB-single-line-in-64KiB-pieces",
         files={"all_big.py": py(f"sys.stdout.write('x' * {BIG} + '\\n')")},
         started=["all_big.py"], check=check_big_line),
    Case("only-carriage-returns",
         files={"all_cr.sh": sh(r"printf 'progress 1\rprogress 2\rdone'")},
         started=["all_cr.sh"], stdout=["[all_cr.sh] progress 1\rprogress 2\rdone"]),
    Case("200KB-of-carriage-returns-no-newline",
         files={"all_cr.py": py("sys.stdout.write('\\r' * 200_000)")},
         started=["all_cr.py"], check=check_cr_flood),
    Case("nul-bytes-in-output", files={"all_nul.sh": sh(r"printf 'a\0b\n\0\n'")},
         started=["all_nul.sh"], stdout=["[all_nul.sh] a\0b", "[all_nul.sh] \0"]),
    Case("crlf-script", files={"all_crlf.sh": "#!/bin/bash\r\necho hi\r\n"},
         started=["all_crlf.sh"], stdout=["[all_crlf.sh] hi\r"]),
    Case("closes-stdout-and-keeps-running",
         files={"all_quiet.sh": sh("echo before\nexec >&-\necho closed >&2\nsleep 30")},
         interact=keeps_running_then_sigterm("all_quiet.sh", "[all_quiet.sh] closed"),
         started=["all_quiet.sh"], stdout=["[all_quiet.sh] before", "[all_quiet.sh] closed"],
         logs=["SIGTERM: stopping plugins", "plugin all_quiet.sh stopped (killed by SIGTERM)"],
         check=check_stopped),
    Case("closes-stdout-and-stderr-and-keeps-running",
         files={"all_mute.sh": sh("exec >&- 2>&-\nsleep 30")},
         interact=keeps_running_then_sigterm("all_mute.sh", None),
         started=["all_mute.sh"], stdout=[],
         logs=["plugin all_mute.sh stopped (killed by SIGTERM)"], check=check_stopped),
    Case("daemonizes-leaving-the-process-group",
         files={"all_daemon.py": DAEMON.replace("{redirect}", REDIRECT)},
         env={"TMP_DIR": "{tmp}"}, started=["all_daemon.py"],
         stdout=["[all_daemon.py] parent exits"],
         logs=["plugin all_daemon.py exited with code 0"], check=daemon_check),
    Case("daemonizes-keeping-the-output-pipes",
         files={"all_daemon.py": DAEMON.replace("{redirect}", "")},
         env={"TMP_DIR": "{tmp}"}, started=["all_daemon.py"],
         stdout=["[all_daemon.py] parent exits"],
         logs=["plugin all_daemon.py exited with code 0"], check=daemon_check),
    # --- names
    Case("name-with-spaces", files={"all_my plugin.sh": sh('echo "$LMCACHE_PLUGIN_NAME"'),
                                    "all my plugin.sh": sh("echo role 'ALL MY PLUGIN'")},
         started=["all_my plugin.sh"], stdout=["[all_my plugin.sh] all_my plugin.sh"]),
    Case("unicode-name", files={"all_плагин_ü.sh": sh('echo "привет $LMCACHE_PLUGIN_NAME"')},
         started=["all_плагин_ü.sh"], stdout=["[all_плагин_ü.sh] привет all_плагин_ü.sh"]),
    Case("unicode-digits-are-not-a-worker-id", files={"all_١٢_x.sh": sh("echo hi")},
         started=["all_١٢_x.sh"], stdout=["[all_١٢_x.sh] hi"]),
    Case("name-not-utf-8", files={"all_\udcff\udcfe.sh": sh("echo hi")},
         started=[r"all_\udcff\udcfe.sh"], check=check_non_utf8_name),
    Case("leading-dots-are-hidden",
         files={".all_hidden.sh": sh("echo no"), ".git/all_x.sh": sh("echo no"),
                "all_ok.sh": sh("echo ok")},
         started=["all_ok.sh"], stdout=["[all_ok.sh] ok"]),
    Case("leading-dots-are-hidden-in-list",
         files={".all_hidden.sh": "", ".git/all_x.sh": "", "all_ok.sh": ""}, action="list",
         selected=["all_ok.sh"]),
    Case("no-role-or-bare-role",
         files={"_x.sh": sh("echo no"), "all.sh": sh("echo bare"), "ALL_UP.SH": sh("echo up")},
         started=["ALL_UP.SH", "all.sh"], stdout=["[all.sh] bare", "[ALL_UP.SH] up"]),
    Case("longest-file-name", files={LONG_NAME: sh("echo long")}, started=[LONG_NAME],
         stdout=[f"[{LONG_NAME}] long"]),
    Case("deeply-nested-folders", files={DEEP: sh("echo deep")}, started=[DEEP],
         stdout=[f"[{DEEP}] deep"]),
    Case("folder-named-like-a-plugin", files={"all_x.sh/all_inner.sh": sh("echo inner")},
         started=["all_x.sh/all_inner.sh"], stdout=["[all_x.sh/all_inner.sh] inner"]),
    Case("fifo-named-like-a-plugin-does-not-hang", files={"all_ok.sh": sh("echo ok")},
         setup=make_fifo, seconds=4, started=["all_ok.sh"], stdout=["[all_ok.sh] ok"]),
    Case("fifo-named-like-a-plugin-in-list", files={"all_ok.sh": ""}, setup=make_fifo,
         action="list", seconds=4, check=fifo_not_selected),
    Case("symlink-loops", files={"all_x.sh": sh("echo once")}, setup=symlink_loop,
         started=["all_x.sh"], stdout=["[all_x.sh] once"]),
    Case("broken-symlink-refused-others-run", files={"all_ok.sh": sh("echo ok")},
         setup=broken_symlink, started=["all_ok.sh"], stdout=["[all_ok.sh] ok"],
         logs=["plugin all_broken.sh refused: {dir}/all_broken.sh: cannot check permissions: "
               "No such file or directory"]),
    # --- roles and worker IDs
    Case("role-with-digits",
         files={"worker2_x.sh": sh("echo two"), "worker_x.sh": sh("echo one")}, role="worker2",
         started=["worker2_x.sh"], stdout=["[worker2_x.sh] two"]),
    Case("role-with-digits-in-list", files={"worker2_x.sh": "", "worker_x.sh": ""},
         action="list", selected=["worker_x.sh"],
         reasons={"worker2_x.sh": "targets role WORKER2", "worker_x.sh": "targets role WORKER"}),
    Case("worker-id-with-30-digits-not-worker-0",
         files={f"all_{WORKER30}_x.sh": sh("echo no"), "all_ok.sh": sh("echo ok")},
         args=["--plugin-location", "{dir}", "--worker-id", "0", "--worker-count", "2"],
         started=["all_ok.sh"], stdout=["[all_ok.sh] ok"]),
    Case("worker-id-with-30-digits-in-list", files={f"all_{WORKER30}_x.sh": ""},
         action="list", selected=[], code=1,  # list: 1 when nothing would run
         reasons={f"all_{WORKER30}_x.sh": f"targets worker {WORKER30}"}),
    Case("worker-id-with-30-digits-runs-there",
         files={f"all_{WORKER30}_x.sh": sh('echo "$LMCACHE_PLUGIN_WORKER_ID"')},
         args=["--plugin-location", "{dir}", "--worker-id", WORKER30,
               "--worker-count", WORKER30 + "1"],
         started=[f"all_{WORKER30}_x.sh"], stdout=[f"[all_{WORKER30}_x.sh] {WORKER30}"]),
    Case("bad-role-argument", role="work_er", code=2,
         error="error: --role: role must not contain '_', '/' or spaces, got 'work_er'"),
    # --- folders and locations
    Case("10000-files-in-a-folder",
         files={"all_a.sh": sh("echo a"), "crowd/worker_b.sh": sh("echo b")},
         setup=many_files, started=["all_a.sh", "crowd/worker_b.sh"],
         stdout=["[all_a.sh] a", "[crowd/worker_b.sh] b"], check=check_fast(10.0)),
    Case("unreadable-subfolder-warns-others-run", files={"all_ok.sh": sh("echo ok")},
         setup=unreadable_folder, runner=run_without_dac_caps, started=["all_ok.sh"],
         stdout=["[all_ok.sh] ok"], logs=["{dir}/locked: cannot read folder: Permission denied"]),
    Case("dotdot-in-location", files={"sub/.keep": "", "all_x.sh": sh("echo x")},
         args=["--plugin-location", "{dir}/sub/../"], started=["all_x.sh"],
         stdout=["[all_x.sh] x"]),
    Case("duplicate-locations-run-once", files={"all_x.sh": sh("echo once")},
         setup=alias_location,
         args=["--config", "{tmp}/dup.yaml", "--plugin-location", "{dir}",
               "--plugin-location", "{dir}/", "--plugin-location", "{dir}/all_x.sh"],
         started=["all_x.sh"], stdout=["[all_x.sh] once"]),
    Case("file-deleted-between-discovery-and-launch",
         files={"all_gone.sh": sh("echo never"), "all_ok.sh": sh("echo ok")},
         runner=run_api_deleting("all_gone.sh"), code=1, started=["all_gone.sh", "all_ok.sh"],
         stdout_has=["[all_ok.sh] ok"], logs=["plugin all_gone.sh exited with code 2"]),
    # --- interpreters
    Case("shebang-to-missing-interpreter-falls-back",
         files={"all_x.py": "#!/nonexistent/python9\nprint('fallback ok')\n"},
         started=["all_x.py"], stdout=["[all_x.py] fallback ok"],
         logs=["{dir}/all_x.py: interpreter '/nonexistent/python9' not found, using {python}"]),
    Case("env-shebang-to-missing-program-falls-back",
         files={"all_x.sh": "#!/usr/bin/env nosuch-prog-xyz -q\necho fallback\n"},
         started=["all_x.sh"], stdout=["[all_x.sh] fallback"],
         logs=["{dir}/all_x.sh: interpreter 'nosuch-prog-xyz' not found, using bash"]),
    Case("shebang-to-non-executable-file-falls-back",
         files={"all_x.sh": "#!{tmp}/notexec\necho fallback\n"}, setup=not_executable_interpreter,
         started=["all_x.sh"], stdout=["[all_x.sh] fallback"],
         logs=["interpreter '{tmp}/notexec'", "using bash"]),
    Case("shebang-to-a-folder-falls-back", files={"all_x.sh": "#!/tmp\necho fallback\n"},
         started=["all_x.sh"], stdout=["[all_x.sh] fallback"],
         logs=["{dir}/all_x.sh: interpreter '/tmp' not found, using bash"]),
    # --- configuration
    Case("config-with-unknown-keys-passed-to-plugins",
         files={"all_cfg.py": py("import json\nc = json.loads(os.environ['LMCACHE_PLUGIN_CONFIG'])"
                                 "\nprint(json.dumps({k: c[k] for k in "
                                 "('my_custom', 'top', 'extra_config')}, sort_keys=True))")},
         setup=config_file("plugin_locations: ['{dir}']\nmy_custom: {nested: [1, 2], "
                           "deep: {k: v}}\ntop: 7\nextra_config: {port: 9}\n"),
         args=["--config", "{tmp}/lmcache.yaml"], started=["all_cfg.py"],
         check=check_config_values),
    Case("yaml-alias-bomb-is-bounded", files={"all_x.sh": sh("echo no")},
         setup=config_file("plugin_locations: ['{dir}']\n"
                           "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
                           + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n"
                                     for p, c in zip("abcdefgh", "bcdefghi", strict=True))),
         args=["--config", "{tmp}/lmcache.yaml"], code=2,
         error="error: {tmp}/lmcache.yaml: configuration expands to more than 1,000,000 values "
               "(YAML alias bomb?)", check=check_fast(10.0)),
    Case("malformed-yaml", setup=config_file("plugin_locations: [unclosed\n"),
         args=["--config", "{tmp}/lmcache.yaml"], code=2,
         error="error: {tmp}/lmcache.yaml: malformed YAML (line 2): expected ',' or ']', "
               "but got '<stream end>'"),
    Case("config-top-level-list", setup=config_file("- a\n- b\n"),
         args=["--config", "{tmp}/lmcache.yaml"], code=2,
         error="error: {tmp}/lmcache.yaml: expected a mapping at the top level, got list"),
    Case("extra-config-env-is-a-list", env={"LMCACHE_EXTRA_CONFIG": "[1,2]"}, code=2,
         error="error: LMCACHE_EXTRA_CONFIG: expected a JSON object, got list"),
    Case("extra-config-env-is-a-string", env={"LMCACHE_EXTRA_CONFIG": '"text"'}, code=2,
         error="error: LMCACHE_EXTRA_CONFIG: expected a JSON object, got str"),
    Case("plugin-locations-env-is-not-a-list-of-paths",
         env={"LMCACHE_PLUGIN_LOCATIONS": "[1, 2]"}, args=[], code=2,
         error="error: LMCACHE_PLUGIN_LOCATIONS: expected a list of paths, got [1, 2]"),
]


def write_files(ctx: Ctx, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        path = ctx.dir / name
        for parent in reversed(path.relative_to(ctx.dir).parents):
            safe_dir(ctx.dir / parent)
        data = content.encode() if isinstance(content, str) else content
        path.write_bytes(ctx.sub(data.decode("utf-8", "surrogateescape"))
                         .encode("utf-8", "surrogateescape"))
        path.chmod(0o755)


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.xfail, strict=False)]
                 if c.xfail else []) for c in CASES])
def test_hostile_input(case: Case, tmp_path: Path, tracker: ProcessTracker) -> None:
    ctx = Ctx(tmp_path, safe_dir(tmp_path / "plugins"), tracker)
    write_files(ctx, case.files)
    if case.setup is not None:
        case.setup(ctx)

    out = (case.runner or run_cli)(ctx, case)
    tracker.add(*out.pids)

    details = f"\nstdout: {out.stdout[:20]!r}\nstderr:\n{out.stderr}"
    assert out.code == case.code, details
    assert not [m for m in out.messages() if "internal error" in m], details
    assert "Traceback" not in out.stderr, details
    if case.error is not None:
        errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
        assert errors == [ctx.sub(case.error)], details
    if case.code == 2:
        assert out.started == [] and out.stdout == [], details
    if case.started is not None:
        assert out.started == sorted(case.started), details
    if case.action == "list" and case.code in (0, 1):
        decisions = {d["name"]: d for d in json.loads("\n".join(out.stdout))}
        if case.selected is not None:
            assert sorted(n for n, d in decisions.items() if d["selected"]) == case.selected
        for name, reason in case.reasons.items():
            assert decisions[name]["reason"] == reason
    else:
        if case.stdout is not None:
            assert sorted(out.stdout) == sorted(ctx.sub(s) for s in case.stdout), details
        for line in case.stdout_has:
            assert ctx.sub(line) in out.stdout, details
    for text in case.logs:
        assert log_has(out, ctx.sub(text)), f"no log line with {ctx.sub(text)!r}" + details
    if case.check is not None:
        case.check(ctx, out)
    # whatever happened, nothing the launcher started is left running
    assert not [p for p in out.pids if alive(p)], details


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
