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
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, NoReturn

from .config import ConfigError, LauncherConfig, load_config
from .identity import IdentityError, detect_worker_identity
from .launcher import PluginLauncher, check_role
from .output import StreamSink
from .process import State

log = logging.getLogger("plugin_launcher.cli")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class UsageError(Exception):
    """Bad arguments or configuration: one ``error:`` line and exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="configuration file (default: $LMCACHE_CONFIG_FILE, else env vars)")
    parser.add_argument("--plugin-location", metavar="PATH", action="append", default=[],
                        help="folder or file to search, added to the configured ones")
    parser.add_argument("--role", required=True, help="role of this process (e.g. scheduler)")
    parser.add_argument("--worker-id", default="0", metavar="N|auto",
                        help="worker ID (default 0; auto: from torchrun/Slurm/MPI/PMI/k8s)")
    parser.add_argument("--worker-count", default="1", metavar="N|auto",
                        help="number of workers (default 1; auto: from the cluster launcher)")
    parser.add_argument("--allow-insecure", action="store_true",
                        help="run plugins writable by others (warn instead of refusing)")


def build_parser() -> Parser:
    parser = Parser(prog="plugin-launcher", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True, parser_class=Parser)
    run = sub.add_parser("run", help="run the selected plugins (optionally beside a command)",
                         usage="%(prog)s [options] --role ROLE [-- COMMAND [ARG]...]")
    _add_common(run)
    run.add_argument("--stop-timeout", type=float, metavar="SECONDS",
                     help="seconds between SIGTERM and SIGKILL (overrides the default option)")
    run.add_argument("--status-addr", metavar="HOST:PORT",
                     help="serve GET /status and /metrics here (host defaults to 127.0.0.1)")
    run.add_argument("--watch", action="store_true",
                     help="follow the plugin folders: start, stop and restart plugins live")
    listing = sub.add_parser("list", help="show every plugin found and whether it runs here")
    _add_common(listing)
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    return parser


def _count(value: str, flag: str, minimum: int) -> int | None:
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < minimum:
        raise UsageError(f"{flag}: expected an integer >= {minimum} or 'auto', got {value!r}")
    return int(value)


def _identity(args: argparse.Namespace) -> tuple[int, int]:
    worker_id = _count(args.worker_id, "--worker-id", 0)
    worker_count = _count(args.worker_count, "--worker-count", 1)
    if worker_id is None or worker_count is None:
        try:
            identity = detect_worker_identity()
        except IdentityError as exc:
            raise UsageError(str(exc)) from None
        if worker_id is None:
            worker_id = identity.worker_id
        if worker_count is None:
            if identity.worker_count is None:
                raise UsageError(f"--worker-count auto: {identity.source} gives only the worker "
                                 "ID (JOB_COMPLETION_INDEX); pass --worker-count N")
            worker_count = identity.worker_count
    if worker_id >= worker_count:
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
        if not stop_timeout >= 0:
            raise UsageError(f"--stop-timeout: must be >= 0, got {stop_timeout}")
        config = replace(config, options=config.options.with_default(stop_timeout=stop_timeout))
    if not config.plugin_locations:
        log.warning("no plugin location configured (use --config or --plugin-location)")
    return config


def _make_launcher(args: argparse.Namespace, **kwargs: Any) -> PluginLauncher:
    config = _config(args)
    try:
        role = check_role(args.role)
    except ValueError as exc:
        raise UsageError(f"--role: {exc}") from None
    worker_id, worker_count = _identity(args)
    return PluginLauncher(config, role, worker_id, worker_count, **kwargs)


def cmd_list(args: argparse.Namespace) -> int:
    from .limits import mechanism

    launcher = _make_launcher(args)
    plan = launcher.plan()
    for warning in plan.warnings:
        log.warning("%s", warning)
    if args.json:
        print(json.dumps([d.to_json() for d in plan.decisions], indent=2))
        return 0
    width = max((len(d.name) for d in plan.decisions), default=4)
    for d in plan.decisions:
        mark = "error" if d.selected and d.error else ("run" if d.selected else "skip")
        detail = d.error or (" ".join(d.command) if d.selected and d.command else "")
        print(f"{mark:<5} {d.name:<{width}}  {d.reason}" + (f"  [{detail}]" if detail else ""))
        for warning in d.warnings:
            print(f"      {'':<{width}}  warning: {warning}")
    print(f"# role {launcher.role}, worker {launcher.worker_id} of {launcher.worker_count}; "
          f"{len(plan.selected)} of {len(plan.decisions)} plugins selected")
    print(f"# limits: {mechanism()}")
    return 0


def _start_command(command: list[str]) -> subprocess.Popen[bytes]:
    """The wrapped server, in its own process group so a terminal's Ctrl-C reaches it once
    (through us) instead of twice; it keeps our stdin, stdout and stderr."""
    try:
        return subprocess.Popen(command, process_group=0)
    except TypeError:  # Python 3.10
        return subprocess.Popen(command, preexec_fn=os.setpgrp)


def exit_code_for(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def cmd_run(args: argparse.Namespace, command: list[str]) -> int:
    launcher = _make_launcher(args, sink=StreamSink(sys.stdout.fileno()))
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
            server = serve_status(launcher.status, host, port)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        except OSError as exc:
            raise UsageError(f"--status-addr: {exc.strerror or exc}") from None
    try:
        launcher.launch_plugins()
        if server is not None:  # logged once plugins (and any watch) are in place
            bound = server.server_address
            log.info("serving status on http://%s:%d/status and /metrics", bound[0], bound[1])
        if command:
            try:
                child = _start_command(command)
            except OSError as exc:
                log.error("cannot run %s: %s", command[0], exc.strerror or exc)
                return 127 if isinstance(exc, FileNotFoundError) else 126
            launcher.guard_group(child.pid, 10.0)
            selector.register(os.pidfd_open(child.pid), selectors.EVENT_READ, "child")
        elif launcher.settled and not launcher.config.watch_plugins:
            return _plain_exit_code(launcher)
        while True:
            for key, _ in selector.select():
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
                    if child is None and not launcher.config.watch_plugins and launcher.settled:
                        return _plain_exit_code(launcher)
                elif key.data == "child" and child is not None:
                    code = child.wait()
                    log.info("%s %s; stopping plugins", command[0], _describe(code))
                    return exit_code_for(code)
    finally:
        launcher.stop_plugins()
        if server is not None:
            server.server_close()
        signal.set_wakeup_fd(-1)
        selector.close()
        for fd in (wake_r, wake_w, notify_r, notify_w):
            os.close(fd)


def _describe(code: int) -> str:
    from .process import describe_returncode

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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1:]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s plugin-launcher %(levelname)s %(message)s")
    try:
        args = build_parser().parse_args(argv)
        if command and args.action != "run":
            raise UsageError("a command after -- is only accepted by run")
        if args.action == "list":
            return cmd_list(args)
        return cmd_run(args, command)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
