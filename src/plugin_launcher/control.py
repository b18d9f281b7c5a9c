"""The control socket (``run --control``) and its client (``plugin-launcher ctl``).

A Unix stream socket, mode 0600, whose peers are checked with SO_PEERCRED (the launcher's user or
root only).  The protocol is one JSON request line, then JSON response lines:

    -> {"op": "restart", "name": "all_metrics.py"}
    <- {"ok": true, "plugin": {...status...}}
    -> {"op": "tail", "name": "all_metrics.py", "n": 5, "follow": true}
    <- {"ok": true, "lines": ["...", ...]}
    <- {"line": "...", "stream": "stdout"}                  (follow: one per new line)
    <- {"end": "the launcher is stopping"}

Errors are ``{"ok": false, "error": "one line"}``.  One small accepting thread (it waits on a
selector, so it costs nothing while idle) hands each connection to a short-lived thread that uses
the launcher's thread-safe API; socket timeouts mean an idle or stuck client holds only its own
thread, never the others, and never the supervisor loop.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import queue
import selectors
import socket
import stat
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .folders import private_folder

log = logging.getLogger("plugin_launcher.control")
CLIENT_TIMEOUT = 5.0  # seconds a client may take to send its request or to take a reply
MAX_REQUEST = 64 * 1024
MAX_HANDLERS = 16  # connections served at once (a tail -f holds one)
FOLLOW_BYTES = 4 << 20  # output buffered for one tail -f client before lines are skipped
FOLLOW_CHECK = 1.0  # a follower looks whether its client is gone this often while quiet
SUN_PATH_MAX = 107
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_LAUNCHER = 0, 1, 2, 3


class ControlError(Exception):
    """The control socket cannot be set up (bad folder, path in use...): one line."""


# -------------------------------------------------------------------------------------- paths
def default_folder() -> str:
    """``$XDG_RUNTIME_DIR/plugin-launcher``, else ``/tmp/plugin-launcher-<uid>``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime) and os.path.isdir(runtime):
        return os.path.join(runtime, "plugin-launcher")
    return f"/tmp/plugin-launcher-{os.getuid()}"


def default_path(role: str | None, worker_id: int | None) -> str:
    """``<folder>/<role>-<worker>.sock`` (role in lower case; no worker ID: ``<role>.sock``)."""
    stem = (role or "launcher").lower()
    if worker_id is not None:
        stem += f"-{worker_id}"
    return os.path.join(default_folder(), stem + ".sock")


def ensure_private_folder(folder: str) -> None:
    """Create ``folder`` with mode 0700 if missing; refuse one that others could tamper with."""
    problem = private_folder(folder)
    if problem is not None:
        raise ControlError(f"control socket folder {folder} {problem}; refusing to use it")


def answers(path: str) -> bool:
    """True if something listens on the Unix socket ``path`` (a live launcher)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError as exc:
            raise ControlError(f"{path}: cannot tell whether a launcher uses it: "
                               f"{exc.strerror or exc}") from None
        return True


def bind_control(path: str) -> socket.socket:
    """A listening socket at ``path``, mode 0600 from the moment it accepts anything.

    Bound under a temporary name, chmod-ed, listening, then renamed over ``path`` (no process-wide
    umask change in a threaded host); a stale socket is replaced only if nobody answers on it."""
    path = os.path.abspath(path)
    temporary = os.path.join(os.path.dirname(path), f".{os.getpid()}.tmp")
    if max(len(os.fsencode(path)), len(os.fsencode(temporary))) > SUN_PATH_MAX:
        raise ControlError(f"path too long for a Unix socket ({SUN_PATH_MAX} bytes at most): "
                           f"{path}")
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ControlError(f"{path} exists and is not a socket; refusing to replace it")
        if answers(path):
            raise ControlError(f"another launcher is already listening on {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        sock.bind(temporary)
        os.chmod(temporary, 0o600)
        sock.listen(MAX_HANDLERS)
        os.replace(temporary, path)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise ControlError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return sock


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def peer_allowed(uid: int, own_uid: int) -> bool:
    return uid == own_uid or uid == 0


# ------------------------------------------------------------------------------------- server
def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _read_request(conn: socket.socket) -> dict[str, Any]:
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError(f"request longer than {MAX_REQUEST} bytes")
    try:
        request = json.loads(data.split(b"\n", 1)[0] or b"null")
    except ValueError:
        raise ValueError("request is not one line of JSON") from None
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        raise ValueError('request must be a JSON object with an "op"')
    return request


def _name(request: dict[str, Any]) -> str:
    name = request.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{request['op']}: a plugin name is needed")
    return name


class ControlServer:
    """Serves the control protocol for one ``PluginLauncher`` until ``close()``."""

    def __init__(self, launcher: Any, path: str) -> None:
        self.launcher = launcher
        self.path = os.path.abspath(path)
        self._sock = bind_control(self.path)
        self._inode = os.stat(self.path).st_ino
        self._closing = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._handlers = threading.BoundedSemaphore(MAX_HANDLERS)
        self._thread = threading.Thread(target=self._serve, name="plugin-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop accepting, end every tail -f, remove the socket file (if it is still ours)."""
        if self._closing.is_set():
            return
        self._closing.set()
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5.0)
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        self._sock.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._sock, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._closing.is_set():
                ready = [key.fileobj for key, _ in selector.select()]
                if self._sock in ready and not self._closing.is_set():
                    try:
                        conn, _ = self._sock.accept()
                    except OSError:
                        continue
                    self._dispatch(conn)

    def _dispatch(self, conn: socket.socket) -> None:
        conn.settimeout(CLIENT_TIMEOUT)
        try:
            uid = peer_uid(conn)
            if not peer_allowed(uid, os.getuid()):
                log.warning("control socket: refused a connection from uid %d", uid)
                _send(conn, {"ok": False, "error": f"permission denied: uid {uid} may not "
                             "control this launcher"})
                conn.close()
                return
            if not self._handlers.acquire(blocking=False):
                _send(conn, {"ok": False, "error": "busy: too many control connections"})
                conn.close()
                return
        except OSError:
            conn.close()
            return
        threading.Thread(target=self._handle, args=(conn,), name="plugin-control-client",
                         daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                try:
                    request = _read_request(conn)
                    reply, follow = self._answer(request)
                except (KeyError, ValueError, RuntimeError) as exc:
                    reply, follow = {"ok": False, "error": str(exc)}, None
                _send(conn, reply)
                if follow is not None:
                    self._follow(conn, follow)
        except OSError:
            pass  # the client went away or stalled past the timeout: its problem alone
        except Exception:  # never raise into the host from this thread
            log.exception("control socket: internal error")
        finally:
            self._handlers.release()

    def _answer(self, request: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        op = request["op"]
        launcher = self.launcher
        if op == "status":
            info = {"pid": os.getpid(), "role": launcher.role, "worker_id": launcher.worker_id}
            return {"ok": True, "launcher": info, "plugins": launcher.status()}, None
        if op == "reload":
            return {"ok": True, "changes": launcher.reload()}, None
        name = _name(request)
        if op == "start":
            return {"ok": True, "plugin": launcher.start_plugin(name)}, None
        if op == "stop":
            timeout = request.get("timeout")
            if timeout is not None and (not isinstance(timeout, (int, float)) or timeout < 0):
                raise ValueError(f"stop: bad timeout {timeout!r}")
            return {"ok": True, "plugin": launcher.stop_plugin(name, timeout)}, None
        if op == "restart":
            return {"ok": True, "plugin": launcher.restart_plugin(name)}, None
        if op == "signal":
            pid = launcher.signal_plugin(name, request.get("signal"))
            return {"ok": True, "pid": pid}, None
        if op == "tail":
            n = request.get("n", 10)
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"tail: -n must be an integer >= 0, got {n!r}")
            lines = launcher.tail(name, n)
            return {"ok": True, "lines": lines}, name if request.get("follow") else None
        raise ValueError(f"unknown operation {op!r} (status, start, stop, restart, signal, "
                         "tail, reload)")

    def _follow(self, conn: socket.socket, name: str) -> None:
        """Stream each new line of ``name`` until the client leaves or the launcher stops."""
        blocks: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        skipped = [0]
        queued = [0]  # bytes waiting for this client: bounded by FOLLOW_BYTES
        lock = threading.Lock()

        def tap(stream: str, block: bytes) -> None:  # on the supervisor loop: never blocks
            with lock:
                if queued[0] + len(block) > FOLLOW_BYTES:
                    skipped[0] += block.count(b"\n")
                    return
                queued[0] += len(block)
            blocks.put((stream, block))

        cancel = self.launcher.follow(name, tap)
        try:
            while not self._closing.is_set():
                try:
                    stream, block = blocks.get(timeout=FOLLOW_CHECK)
                except queue.Empty:
                    if _client_gone(conn):
                        return
                    continue
                with lock:
                    queued[0] -= len(block)
                    lost, skipped[0] = skipped[0], 0
                if lost:
                    _send(conn, {"skipped": lost})
                text = block.decode("utf-8", "replace")
                payload = "".join(json.dumps({"line": line, "stream": stream}) + "\n"
                                  for line in text.split("\n")[:-1])
                conn.sendall(payload.encode())
            _send(conn, {"end": "the launcher is stopping"})
        finally:
            cancel()


def _client_gone(conn: socket.socket) -> bool:
    try:
        conn.setblocking(False)
        try:
            return conn.recv(1) == b""
        except BlockingIOError:
            return False
        finally:
            conn.settimeout(CLIENT_TIMEOUT)
    except OSError:
        return True


def serve_control(launcher: Any, path: str | None) -> ControlServer:
    """``run --control``: ``auto``/None picks the default path (creating its private folder)."""
    if path is None or path == "auto":
        path = default_path(launcher.role, launcher.worker_id)
        ensure_private_folder(os.path.dirname(path))
    server = ControlServer(launcher, path)
    log.info("control socket at %s (plugin-launcher ctl --control %s)", server.path, server.path)
    return server


# ------------------------------------------------------------------------------------- client
class Unreachable(Exception):
    """No launcher answers (exit 3)."""


class Failed(Exception):
    """The launcher answered with an error (exit 1)."""


def request(path: str, message: dict[str, Any], timeout: float | None = None) -> Iterator[Any]:
    """Send one request; yield each response line as it arrives (decoded JSON)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                reason += " (is `plugin-launcher run --control` running?)"
            raise Unreachable(f"cannot connect to the launcher at {path}: {reason}") from None
        try:
            sock.sendall(json.dumps(message).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before it read the request: its one-line reply is still there
        with sock.makefile("rb") as stream:
            for raw in stream:
                yield json.loads(raw)
    finally:
        sock.close()


def add_ctl_parser(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """``plugin-launcher ctl ...`` (added to the CLI's subcommands)."""
    ctl = sub.add_parser("ctl", help="control a running launcher (status, start, stop, ...)",
                         description="Control a running `plugin-launcher run --control`. "
                         "Exit codes: 0 ok, 1 the operation failed, 2 usage, 3 no launcher.")
    ctl.add_argument("--control", metavar="PATH",
                     help="the launcher's control socket (default: from --role/--worker-id, "
                     "else the only socket in the default folder)")
    ctl.add_argument("--role", help="role of the launcher to control (picks the default path)")
    ctl.add_argument("--worker-id", default=None, metavar="N|none",
                     help="its worker ID (default 0; none or -1: a launcher without one)")
    ops = ctl.add_subparsers(dest="op", required=True, parser_class=parser_class)
    status = ops.add_parser("status", help="every plugin's state, PID and restarts")
    status.add_argument("--json", action="store_true", help="print the launcher's JSON reply")
    for op, what in (("start", "start a plugin (ends an operator stop)"),
                     ("stop", "stop a plugin and keep it stopped (across reloads)"),
                     ("restart", "stop and start a plugin (counts as a restart)")):
        ops.add_parser(op, help=what).add_argument("name", metavar="NAME")
    sig = ops.add_parser("signal", help="send a signal to a plugin's main process")
    sig.add_argument("name", metavar="NAME")
    sig.add_argument("signal", metavar="SIG", help="name (TERM, SIGHUP) or number")
    tail = ops.add_parser("tail", help="a plugin's last lines (-f: then follow)")
    tail.add_argument("name", metavar="NAME")
    tail.add_argument("-n", type=int, default=10, metavar="N", help="lines (default 10)")
    tail.add_argument("-f", "--follow", action="store_true", help="stream new lines")
    ops.add_parser("reload", help="rescan the plugin locations once (as SIGHUP)")


def control_path(args: argparse.Namespace, usage: Callable[[str], Exception]) -> str:
    """The socket ``ctl`` talks to (see ``add_ctl_parser``)."""
    if args.control:
        return str(args.control)
    if args.role:
        from .launcher import check_role

        try:
            role = check_role(args.role)
        except ValueError as exc:
            raise usage(f"--role: {exc}") from None
        worker = (args.worker_id or "0").strip().lower()
        if worker in ("none", "-1"):
            return default_path(role, None)
        if not (worker.isascii() and worker.isdigit()):
            raise usage(f"--worker-id: expected an integer, 'none' or -1; got {args.worker_id!r}")
        return default_path(role, int(worker))
    folder = default_folder()
    try:
        found = sorted(f for f in os.listdir(folder) if f.endswith(".sock"))
    except OSError:
        found = []
    if len(found) == 1:
        return os.path.join(folder, found[0])
    if not found:
        raise Unreachable(f"no launcher control socket in {folder} (start `plugin-launcher run "
                          "--control`, or give --control PATH)")
    raise usage(f"several launchers in {folder} ({', '.join(found)}): choose one with "
                "--control PATH or --role/--worker-id")


def _first(replies: Iterator[Any]) -> dict[str, Any]:
    reply = next(replies, None)
    if not isinstance(reply, dict):
        raise Failed("the launcher closed the connection without an answer")
    if not reply.get("ok"):
        raise Failed(str(reply.get("error", "failed")))
    return reply


def _show(text: Any) -> str:
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _print_status(reply: dict[str, Any]) -> None:
    plugins = reply.get("plugins", [])
    width = max([len(_show(p["name"])) for p in plugins] + [6])
    print(f"{'PLUGIN':<{width}}  {'STATE':<8}  {'PID':>7}  {'RESTARTS':>8}  DETAIL")
    for p in plugins:
        detail = p.get("error") or ""
        if p["state"] == "standby" and p.get("holder"):
            detail = f"held by {p['holder']}"  # scope: host, another launcher runs it
        elif not detail and p.get("returncode") is not None and p["state"] not in (
                "starting", "running"):
            detail = (f"signal {p['signal']}" if p.get("signal")
                      else f"exit code {p['returncode']}")
            if p.get("ended_by"):
                detail += f" ({p['ended_by']})"
        if not detail and p.get("status_text"):
            detail = p["status_text"]  # the plugin's last STATUS= (sd_notify)
        pid = "-" if p.get("pid") is None or p["state"] not in ("starting", "running",
                                                                  "stopping") \
            else str(p["pid"])
        print(f"{_show(p['name']):<{width}}  {p['state']:<8}  {pid:>7}  {p['restarts']:>8}  "
              f"{_show(detail)}")


def _run_ctl(args: argparse.Namespace, path: str) -> int:
    op = args.op
    message: dict[str, Any] = {"op": op}
    if op in ("start", "stop", "restart", "signal", "tail"):
        message["name"] = args.name
    if op == "signal":
        message["signal"] = args.signal
    if op == "tail":
        message.update(n=args.n, follow=args.follow)
    replies = request(path, message)
    reply = _first(replies)
    if op == "status":
        if args.json:
            print(json.dumps(reply, indent=1))
        else:
            _print_status(reply)
    elif op in ("start", "stop", "restart"):
        plugin = reply["plugin"]
        name, state, pid = _show(plugin["name"]), plugin["state"], plugin["pid"]
        if op == "stop":
            print(f"{name}: {state}")
        elif state in ("running", "starting"):
            print(f"{name}: running (pid {pid}, restarts {plugin['restarts']})")
        else:
            raise Failed(f"{name} did not start: {state}" + (
                f" ({_show(plugin['error'])})" if plugin.get("error") else ""))
    elif op == "signal":
        print(f"{_show(args.name)}: sent {args.signal} to pid {reply['pid']}")
    elif op == "reload":
        changes = {k: v for k, v in reply["changes"].items() if v}
        print("reloaded: " + ("; ".join(f"{k} {', '.join(map(_show, v))}"
                                         for k, v in changes.items()) or "no change"))
    elif op == "tail":
        out = sys.stdout
        for line in reply["lines"]:
            out.write(_show(line) + "\n")
        out.flush()
        for event in replies:  # follow: until the launcher stops or Ctrl-C
            if "line" in event:
                out.write(_show(event["line"]) + "\n")
                out.flush()
            elif "skipped" in event:
                print(f"ctl: {event['skipped']} lines skipped (reading too slowly)",
                      file=sys.stderr)
    return EXIT_OK


def cmd_ctl(args: argparse.Namespace, usage: Callable[[str], Exception]) -> int:
    """Exit codes: 0 ok, 1 the operation failed, 2 usage (raised as ``usage``), 3 no launcher."""
    try:
        path = control_path(args, usage)
        return _run_ctl(args, path)
    except Unreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_LAUNCHER
    except Failed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:  # our reader (| head) went away
        return EXIT_OK
    except (OSError, ValueError) as exc:
        print(f"error: the connection to the launcher failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
