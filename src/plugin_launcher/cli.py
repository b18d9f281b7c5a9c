"""``plugin-launcher run`` and ``plugin-launcher list``.

The main thread owns signals and waits on one selector (the signal wake-up pipe, a pipe the
supervisor pokes on state changes, and the wrapped command's pidfd), so the CLI also costs nothing
while it waits.  Plugin lines go to stdout in whole batches; the launcher's own messages to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, NoReturn

from .advice import config_key_warnings, role_advice
from .config import ConfigError, LauncherConfig, load_config
from .control import ControlError, add_ctl_parser, cmd_ctl, serve_control
from .identity import (
    AUTO,
    DEFAULT_WORKER_COUNT,
    DEFAULT_WORKER_ID,
    IdentityError,
    resolve_identity,
)
from .launcher import (
    DEFAULT_OUTPUT_BATCH,
    MAX_OUTPUT_BATCH,
    PluginLauncher,
    check_output_batch,
    check_role,
)
from .logs import JsonFormatter, JsonSink, NonBlockingLogHandler
from .machine import describe_returncode, shell_status
from .options import OptionError, check_stop_timeout
from .output import StreamSink, safe_logger, safe_name
from .plan import Plan
from .process import State
from .supervisor import SupervisorStuck

log = safe_logger("plugin_launcher.cli")  # names and paths escaped
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PROGRESS_EVERY = 1.0  # seconds between "waiting for plugin" lines while stopping
WAIT_READY_MARGIN = 1.0  # --wait-ready: past the longest ready_timeout, for its stop to show


class UsageError(Exception):
    """Bad arguments or configuration: one ``error:`` line and exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        if "required: action" in message:  # argparse's wording for a missing sub-command
            message = "missing action: run, list or ctl (see plugin-launcher --help)"
        raise UsageError(message)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="configuration file (default: $LMCACHE_CONFIG_FILE, else env vars)")
    parser.add_argument("--plugin-location", metavar="PATH", action="append", default=[],
                        help="folder or file to search, added to the configured ones")
    parser.add_argument("--role", required=True, help="role of this process (e.g. scheduler)")
    parser.add_argument("--worker-id", default=str(DEFAULT_WORKER_ID), metavar="N|none|auto",
                        help=f"worker ID (default {DEFAULT_WORKER_ID}; none or -1: no worker, as "
                        "LMCache's scheduler; auto: from torchrun/Slurm/MPI/PMI/k8s)")
    parser.add_argument("--worker-count", default=str(DEFAULT_WORKER_COUNT), metavar="N|auto",
                        help=f"number of workers (default {DEFAULT_WORKER_COUNT}; auto: from the "
                        "cluster launcher)")
    parser.add_argument("--allow-insecure", action="store_true",
                        help="run plugins writable by others (warn instead of refusing)")


DESCRIPTION = """\
Run plugins (scripts) as supervised side processes next to a server, selected by their file
names for this process's role and worker ID."""
EXAMPLES = """\
examples:
  plugin-launcher list --role scheduler --config lmcache.yaml
  plugin-launcher run --role worker --worker-id 0 --worker-count 2 --config lmcache.yaml
  plugin-launcher run --role scheduler --config lmcache.yaml -- vllm serve MODEL

Run 'plugin-launcher run --help' or 'plugin-launcher list --help' for each action's options."""
RUN_DESCRIPTION = """\
Start the plugins selected for this role and worker; print their lines as '[name] text' on
stdout and the launcher's own messages on stderr. Ctrl-C (SIGINT) or SIGTERM stops them all;
a second one kills what is left at once. With '-- COMMAND', run COMMAND beside the plugins and
exit with its status."""
RUN_EXAMPLES = """\
examples:
  plugin-launcher run --role scheduler --config lmcache.yaml
  plugin-launcher run --role worker --worker-id auto --worker-count auto --config lmcache.yaml
  plugin-launcher run --role scheduler --plugin-location ./plugins -- python serve.py

exit status: 0 stopped by a signal or every plugin ended well; 1 a plugin failed, or nothing
can run (no COMMAND); 2 bad arguments or configuration; with COMMAND: COMMAND's status."""
LIST_DESCRIPTION = """\
Show every plugin file found, whether it runs for this role and worker ('run', 'skip' or
'error'), why, and the command line it would run."""
LIST_EXAMPLES = """\
examples:
  plugin-launcher list --role worker --worker-id 1 --config lmcache.yaml
  plugin-launcher list --role scheduler --plugin-location ./plugins --all
  plugin-launcher list --role worker --config lmcache.yaml --json

exit status: 0 something would run; 1 nothing would; 2 bad arguments or configuration."""


def version() -> str:
    """The installed distribution's version, else the package's own (a source checkout)."""
    from importlib import metadata

    try:
        return metadata.version("plugin-launcher")
    except metadata.PackageNotFoundError:
        from . import __version__

        return __version__


class _Version(argparse.Action):
    """``--version``, looked up only when asked (importlib.metadata costs every run ~15 ms)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(f"plugin-launcher {version()}")
        parser.exit()


def build_parser() -> Parser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = Parser(prog="plugin-launcher", description=DESCRIPTION, epilog=EXAMPLES,
                    formatter_class=raw)
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="print plugin-launcher's version and exit")
    sub = parser.add_subparsers(dest="action", required=True, parser_class=Parser)
    run = sub.add_parser("run", help="run the selected plugins (optionally beside a command)",
                         usage="%(prog)s [options] --role ROLE [-- COMMAND [ARG]...]",
                         description=RUN_DESCRIPTION, epilog=RUN_EXAMPLES, formatter_class=raw)
    _add_common(run)
    run.add_argument("--stop-timeout", type=float, metavar="SECONDS",
                     help="seconds between SIGTERM and SIGKILL (overrides the default option)")
    run.add_argument("--status-addr", metavar="HOST:PORT",
                     help="serve GET /status and /metrics here (host defaults to 127.0.0.1)")
    run.add_argument("--watch", action="store_true",
                     help="follow the plugin folders: start, stop and restart plugins live")
    run.add_argument("--wait-ready", action="store_true",
                     help="with -- COMMAND: start COMMAND only once every `ready: notify` "
                     "plugin has sent READY=1 (exit 1 after the longest ready_timeout)")
    run.add_argument("--control", nargs="?", const="auto", metavar="PATH",
                     help="serve `plugin-launcher ctl` on this Unix socket (mode 0600; no PATH "
                     "or 'auto': $XDG_RUNTIME_DIR/plugin-launcher/<role>-<worker>.sock)")
    run.add_argument("--log-format", choices=("text", "json"), default="text",
                     help="text: [name] line; json: one object per line (time, plugin, stream, "
                     "pid, line), the launcher's own messages too")
    run.add_argument("--timestamps", action="store_true",
                     help="text format: ISO-8601 UTC time before each plugin line")
    run.add_argument("--output-batch", type=float, metavar="SECONDS",
                     help=f"let plugin output gather this long after each read (default "
                     f"{DEFAULT_OUTPUT_BATCH:g}; 0: read at once; at most "
                     f"{MAX_OUTPUT_BATCH:g})")
    listing = sub.add_parser("list", help="show every plugin found and whether it runs here",
                             description=LIST_DESCRIPTION, epilog=LIST_EXAMPLES,
                             formatter_class=raw)
    _add_common(listing)
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.add_argument("--all", action="store_true",
                         help="also show the files the search ignores, and why")
    add_ctl_parser(sub, Parser)
    return parser


def _count(value: str, flag: str, minimum: int) -> int | str | None:
    """An integer, ``auto`` (from the cluster launcher) or, for a worker ID, ``none``/``-1``."""
    text = value.strip().lower()
    if text == AUTO:
        return AUTO
    if minimum == 0 and text in ("none", "-1"):
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 4000 or int(text) < minimum:
        more = ", 'none' or -1" if minimum == 0 else ""
        raise UsageError(f"{flag}: expected an integer >= {minimum}, 'auto'{more}; got {value!r}")
    return int(text)


def _identity(args: argparse.Namespace) -> tuple[int | None, int]:
    try:
        worker_id, worker_count = resolve_identity(_count(args.worker_id, "--worker-id", 0),
                                                   _count(args.worker_count, "--worker-count", 1))
    except IdentityError as exc:
        raise UsageError(f"--worker-id/--worker-count auto: {exc}") from None
    assert not isinstance(worker_id, str) and isinstance(worker_count, int)
    if worker_id is not None and worker_id >= worker_count:
        log.warning("worker ID %d is not below the worker count %d", worker_id, worker_count)
    return worker_id, worker_count


def _config(args: argparse.Namespace) -> LauncherConfig:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if args.plugin_location:
        config = config.with_locations(args.plugin_location)
    if args.allow_insecure:
        config = replace(config, allow_insecure_plugins=True)
    if getattr(args, "watch", False):
        config = replace(config, watch_plugins=True)
    stop_timeout = getattr(args, "stop_timeout", None)
    if stop_timeout is not None:
        try:
            stop_timeout = check_stop_timeout("--stop-timeout", stop_timeout)
        except OptionError as exc:  # inf, nan, negative or more than an hour
            raise UsageError(str(exc)) from None
        config = replace(config, options=config.options.with_default(stop_timeout=stop_timeout))
    for warning in config_key_warnings(config.data, config.source):
        log.warning("%s", warning)
    if not config.plugin_locations:
        if args.config or config.source not in ("environment", "<dict>"):
            log.warning("%s: no plugin location configured (add plugin_locations, or use "
                        "--plugin-location)", config.source)
        else:
            log.warning("no plugin location configured (use --config or --plugin-location)")
    return config


def _make_launcher(args: argparse.Namespace, **kwargs: Any) -> PluginLauncher:
    config = _config(args)
    try:
        role = check_role(args.role)
    except ValueError as exc:
        raise UsageError(f"--role: {exc}") from None
    worker_id, worker_count = _identity(args)
    return PluginLauncher(config, role, worker_id=worker_id, worker_count=worker_count,
                          **kwargs)


def cmd_list(args: argparse.Namespace) -> int:
    from .containment import Containment
    from .limits import mechanism

    launcher = _make_launcher(args)
    plan = launcher.plan()
    _check_role(args.role, launcher, plan)
    for warning in plan.warnings:
        log.warning("%s", warning)
    code = 1 if _nothing_to_run(launcher, plan) else 0
    ignored = plan.ignored if args.all else []
    if args.json:
        entries = [d.to_json() for d in plan.decisions]
        entries += [{"name": f.name, "path": f.path, "selected": False, "reason": f.reason,
                     "command": None, "error": None, "warnings": [], "ignored": True}
                    for f in ignored]
        print(json.dumps(entries, indent=2))
        return code
    shown = safe_name  # names, paths and reasons come from file names: one safe line each
    width = max((len(shown(n)) for n in [*(d.name for d in plan.decisions),
                                         *(f.name for f in ignored)]), default=4)
    for d in plan.decisions:
        mark = "error" if d.selected and d.error else ("run" if d.selected else "skip")
        detail = shown(d.error or (" ".join(d.command) if d.selected and d.command else ""))
        print(f"{mark:<6} {shown(d.name):<{width}}  {shown(d.reason)}"
              + (f"  [{detail}]" if detail else ""))
        for warning in d.warnings:
            print(f"       {'':<{width}}  warning: {shown(warning)}")
    for f in ignored:
        print(f"{'ignore':<6} {shown(f.name):<{width}}  {shown(f.reason)}")
    print(f"# role {launcher.role}, worker {launcher.worker_id} of {launcher.worker_count}; "
          f"{len(plan.selected)} of {len(plan.decisions)} plugins selected"
          + (f"; {len(plan.ignored)} other files ignored (--all shows them)"
             if plan.ignored and not args.all else ""))
    containment = Containment.detect()  # an empty launcher cgroup, removed at once
    containment.close()
    print(f"# limits: {mechanism(containment)}")
    print(f"# containment: {containment.describe()}")
    return code


def _check_role(given: str | None, launcher: PluginLauncher, plan: Plan) -> None:
    """A near-miss role that no file targets is a usage error; another unknown role a warning."""
    if given is None or launcher.role is None:
        return
    error, warning = role_advice(given, [d.name for d in plan.decisions])
    if error is not None:
        raise UsageError(error)
    if warning is not None:
        log.warning("%s", warning)


def _nothing_to_run(launcher: PluginLauncher, plan: Plan) -> str | None:
    """Why no plugin can run in this process (one line), or None if one can."""
    if any(d.selected and d.command is not None for d in plan.decisions):
        return None
    where = f"role {launcher.role}, worker {launcher.worker_id}"
    if not launcher.config.plugin_locations:
        return "no plugin location configured"
    if not plan.decisions:
        return "no plugin file found in " + ", ".join(launcher.config.plugin_locations)
    if plan.selected:
        return f"no plugin selected for {where} can run (see the errors above)"
    refused = [d for d in plan.decisions if d.reason.startswith("refused")]
    if refused:
        return (f"every plugin for {where} was refused ({len(refused)}; see the errors above, "
                "or --allow-insecure)")
    return f"no plugin targets {where} ({len(plan.decisions)} found; see plugin-launcher list)"


def _start_command(command: list[str]) -> subprocess.Popen[bytes]:
    """The wrapped server, in its own process group so a terminal's Ctrl-C reaches it once
    (through us) instead of twice; it keeps our stdin, stdout and stderr."""
    try:
        return subprocess.Popen(command, process_group=0)
    except TypeError:  # Python 3.10
        return subprocess.Popen(command, preexec_fn=os.setpgrp)


def exit_code_for(returncode: int) -> int:
    """A return code as a shell exit status (128+N for signal N): machine.shell_status."""
    return shell_status(returncode)


def cmd_run(args: argparse.Namespace, command: list[str]) -> int:
    batch = DEFAULT_OUTPUT_BATCH
    if args.output_batch is not None:
        try:
            batch = check_output_batch(args.output_batch)
        except ValueError as exc:
            raise UsageError(f"--output-batch: {exc}") from None
    sink = _output_sink(args)
    try:
        return _run(args, command, sink, batch)
    finally:
        dropped = sink.finish()  # a reader that stopped reading does not hold up the exit
        if dropped:
            log.warning("stdout reader stopped reading: %d bytes of plugin output dropped at "
                        "exit", dropped)
        sink.close()


def _run(args: argparse.Namespace, command: list[str], sink: StreamSink, batch: float) -> int:
    launcher = _make_launcher(args, sink=sink, output_batch=batch)
    plan = launcher.plan()  # for the operator's mistakes; launch_plugins() plans again
    _check_role(args.role, launcher, plan)
    why = _nothing_to_run(launcher, plan)
    wake_r, wake_w = os.pipe()
    notify_r, notify_w = os.pipe()
    for fd in (wake_r, wake_w, notify_r, notify_w):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake_w)
    for sig in FORWARDED:
        signal.signal(sig, lambda *_: None)  # the wake-up fd carries the signal number

    def poke() -> None:
        try:
            os.write(notify_w, b".")
        except BlockingIOError:
            pass

    launcher.add_listener(poke)
    selector = selectors.DefaultSelector()
    selector.register(wake_r, selectors.EVENT_READ, "signal")
    selector.register(notify_r, selectors.EVENT_READ, "notify")
    server = None
    child: subprocess.Popen[bytes] | None = None
    if args.status_addr:  # before any plugin starts: a bad address is a usage error
        from .status_server import parse_address, serve_status

        try:
            host, port = parse_address(args.status_addr)
            server = serve_status(launcher.status_snapshot, host, port)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        except OSError as exc:
            raise UsageError(f"--status-addr: {exc.strerror or exc}") from None
    control = None
    if args.control is not None:  # also before any plugin starts
        try:
            control = serve_control(launcher, args.control)
        except ControlError as exc:
            raise UsageError(f"--control: {exc}") from None
    stay = launcher.config.watch_plugins or control is not None  # plugins may start again
    if args.wait_ready and not command:
        raise UsageError("--wait-ready: needs a COMMAND after -- (it orders COMMAND after the "
                         "plugins' readiness)")
    try:
        launcher.launch_plugins()
        if why is not None:
            if not command and not launcher.config.watch_plugins:
                log.error("nothing to run: %s", why)
                return 1
            log.warning("nothing to run yet: %s; %s", why,
                        f"running {command[0]} anyway" if command else "watching for plugins")
        if server is not None:  # logged once plugins (and any watch) are in place
            bound = server.server_address
            log.info("serving status on http://%s:%d/status and /metrics", bound[0], bound[1])
        if command and args.wait_ready:
            early = _await_ready(launcher, command[0], selector, wake_r, notify_r)
            if early is not None:
                return early
        if command:
            try:
                child = _start_command(command)
            except OSError as exc:
                log.error("cannot run %s: %s", command[0], exc.strerror or exc)
                return 127 if isinstance(exc, FileNotFoundError) else 126
            launcher.guard_group(child.pid, 10.0)
            selector.register(os.pidfd_open(child.pid), selectors.EVENT_READ, "child")
        elif launcher.settled and not stay:
            return _plain_exit_code(launcher)
        while True:
            for key, _ in _select(selector):
                if key.data == "signal":
                    for signum in _drain(wake_r):
                        if child is not None:
                            child.send_signal(signum)
                            if signum == signal.SIGHUP:
                                launcher.reload()
                        elif signum == signal.SIGHUP:
                            log.info("SIGHUP: reloading plugins")
                            launcher.reload()
                        else:
                            log.info("%s: stopping plugins", signal.Signals(signum).name)
                            return 0
                elif key.data == "notify":
                    _drain(notify_r)
                    if child is None and not stay and launcher.settled:
                        return _plain_exit_code(launcher)
                elif key.data == "child" and child is not None:
                    code = child.wait()
                    log.info("%s %s; stopping plugins", command[0], _describe(code))
                    return exit_code_for(code)
    finally:
        if control is not None:  # first: no request may start a plugin while they stop
            control.close()
        _stop_with_feedback(launcher, selector, wake_r, notify_r)
        if server is not None:
            server.server_close()
        signal.set_wakeup_fd(-1)
        selector.close()
        for fd in (wake_r, wake_w, notify_r, notify_w):
            os.close(fd)


def _await_ready(launcher: PluginLauncher, name: str, selector: selectors.BaseSelector,
                 wake_r: int, notify_r: int) -> int | None:
    """``--wait-ready``: wait until every ``ready: notify`` plugin is ready (None: start
    COMMAND), else the exit status: 1 if one ended before it was ready or the longest
    ``ready_timeout`` passed, 128+N if signal N came first."""
    from .status_page import readiness

    waiting = [p for p in launcher.plugins if p.decision.options.ready == "notify"]
    if not waiting:
        log.info("--wait-ready: no plugin has ready: notify; starting %s", name)
        return None
    limit = max(p.decision.options.ready_timeout for p in waiting)
    deadline = time.monotonic() + limit + WAIT_READY_MARGIN  # its own timeout is seen first
    log.info("--wait-ready: starting %s once %s %s ready (at most %gs)", name,
             ", ".join(safe_name(p.name) for p in waiting),
             "is" if len(waiting) == 1 else "are", limit)
    while True:
        status = launcher.status()
        code, why = readiness(status)
        if code == 200:
            log.info("--wait-ready: ready; starting %s", name)
            return None
        for entry in status:
            if entry.get("ready_mode") == "notify" and entry["state"] in (
                    "failed", "exited", "stopped") and not entry.get("ready"):
                code_text = (describe_returncode(entry["returncode"])
                             if entry.get("returncode") is not None else entry["state"])
                end = entry.get("ended_by") or entry.get("error") or code_text
                log.error("--wait-ready: plugin %s ended before it was ready (%s); not "
                          "starting %s", entry["name"], end, name)
                return 1
        left = deadline - time.monotonic()
        if left <= 0:
            log.error("--wait-ready: %s after the longest ready_timeout (%gs); not starting %s",
                      why, limit, name)
            return 1
        for key, _ in _select(selector, min(left, 1.0)):
            if key.data == "notify":
                _drain(notify_r)
            elif key.data == "signal":
                for signum in _drain(wake_r):
                    if signum == signal.SIGHUP:
                        launcher.reload()
                    else:
                        log.info("%s before the plugins were ready: stopping plugins (%s not "
                                 "started)", signal.Signals(signum).name, name)
                        return 128 + signum


def _output_sink(args: argparse.Namespace) -> StreamSink:
    """The sink for ``--log-format`` / ``--timestamps``; JSON also formats our own messages."""
    try:
        sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # started with stdout closed (`>&-`)
        raise UsageError("stdout is closed: plugin lines would have nowhere to go (redirect "
                         "it to /dev/null to discard them)") from None
    if args.log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
        return JsonSink(sys.stdout.fileno())
    return StreamSink(sys.stdout.fileno(), timestamps=args.timestamps)


def _stop_with_feedback(launcher: PluginLauncher, selector: selectors.BaseSelector,
                        wake_r: int, notify_r: int) -> None:
    """Stop every plugin while still reading signals: each second, one line per plugin still
    awaited; a second SIGINT or SIGTERM SIGKILLs what is left at once."""
    for key in list(selector.get_map().values()):
        if key.data == "child":  # the wrapped command has ended (or is left to the guardian)
            selector.unregister(key.fd)
            os.close(key.fd)
    try:
        _await_stop(launcher, selector, wake_r, notify_r)
    except SupervisorStuck:
        pass  # stop_plugins ends the groups from this thread
    launcher.stop_plugins()


def _await_stop(launcher: PluginLauncher, selector: selectors.BaseSelector,
                wake_r: int, notify_r: int) -> None:
    launcher.begin_stop()
    next_report = time.monotonic() + PROGRESS_EVERY
    killed = False
    while not launcher.stopped:
        for key, _ in _select(selector, max(0.0, next_report - time.monotonic())):
            if key.data == "notify":
                _drain(notify_r)
            elif key.data == "signal":
                second = {signal.SIGINT, signal.SIGTERM} & set(_drain(wake_r))
                if second and not killed:
                    log.warning("second signal: killing remaining plugins now")
                    launcher.kill_remaining()
                    killed = True
        if time.monotonic() >= next_report:
            next_report = time.monotonic() + PROGRESS_EVERY
            for name, pid, left in launcher.awaited():
                when = "SIGKILL sent" if left is None else f"SIGKILL in {left:.1f}s"
                log.info("waiting for plugin %s (pid %d), %s", name, pid, when)


def _describe(code: int) -> str:
    return describe_returncode(code)


def _plain_exit_code(launcher: PluginLauncher) -> int:
    failed = any(p.last_failure or p.state == State.FAILED for p in launcher.plugins)
    return 1 if failed else 0


def _drain(fd: int) -> bytes:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 256)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


_LOG_HANDLER: list[NonBlockingLogHandler] = []  # the CLI's stderr handler, when it has one
LOG_RETRY = 0.2  # seconds between attempts to push our pending messages to a lagging reader
LOG_FINISH_STALL = 0.5  # at exit, our pending messages wait this long for a reader that reads none


def _configure_logging() -> None:
    """Our messages to stderr through a handler that never blocks (logs.NonBlockingLogHandler);
    a stderr without a descriptor (an embedding that replaced it) keeps a plain handler."""
    fmt = "%(asctime)s plugin-launcher %(levelname)s %(message)s"
    root = logging.getLogger()
    if root.handlers:  # configured already (an embedding, a test harness): leave it alone
        return
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=fmt)
        return
    handler = NonBlockingLogHandler(fd)
    handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    _LOG_HANDLER.append(handler)


def _select(selector: selectors.BaseSelector,
            timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
    """``selector.select``, also pushing out our own messages while a stderr reader lags."""
    for handler in _LOG_HANDLER:
        if handler.pending():
            handler.flush()
            if handler.pending():
                timeout = LOG_RETRY if timeout is None else min(timeout, LOG_RETRY)
    return selector.select(timeout)


def _finish_logging() -> None:
    for handler in _LOG_HANDLER:
        handler.finish(LOG_FINISH_STALL)


def main(argv: Sequence[str] | None = None) -> int:
    from .guardian_client import GuardianClient

    GuardianClient.idle_wait = 0.0  # this process exits right after the stop: nothing to reap
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1:]
    _configure_logging()
    try:
        return _main(argv, command)
    finally:
        _finish_logging()


def _main(argv: list[str], command: list[str]) -> int:
    parser = build_parser()
    if not argv and not command:  # bare `plugin-launcher`: the usage with examples, not an error
        parser.print_help(sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
        if command and args.action != "run":
            raise UsageError("a command after -- is only accepted by run")
        if args.action == "list":
            return cmd_list(args)
        if args.action == "ctl":
            return cmd_ctl(args, UsageError)
        return cmd_run(args, command)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
