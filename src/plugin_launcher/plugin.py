"""The plugin authors' kit: read the launcher's environment, check options, stop gracefully.

A plugin is a separate process that plugin-launcher (or LMCache's own launcher) starts with
``LMCACHE_PLUGIN_*`` variables and stops with SIGTERM, then SIGKILL a few seconds later. This module
turns those variables into a typed :class:`PluginContext`, checks ``extra_config`` values with
:meth:`PluginContext.option`, and gives a stop signal (:attr:`PluginContext.stopping`) and a
periodic loop (:meth:`PluginContext.every`) that survives errors and hung calls::

    from plugin_launcher.plugin import PluginContext, run

    def main(ctx: PluginContext) -> int:
        interval = ctx.option("interval", float, 10.0, minimum=0.1)
        ctx.every(interval, lambda: ctx.log("still here"), timeout=5)
        return 0

    run(main)

It imports only the standard library, and nothing else from ``plugin_launcher``, so a plugin that
uses it starts fast (the kit is on the path of every plugin the launcher runs with its own Python).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, TypeVar, overload

__all__ = [
    "ENV_CONFIG",
    "ENV_NAME",
    "ENV_PARENT_PID",
    "ENV_ROLE",
    "ENV_WORKER_COUNT",
    "ENV_WORKER_ID",
    "PluginContext",
    "PluginEnvironmentError",
    "log",
    "run",
]

PREFIX = "LMCACHE_PLUGIN_"
RUNTIME_PREFIX = "LMCACHE_RUNTIME_PLUGIN_"
ENV_ROLE = "LMCACHE_PLUGIN_ROLE"
ENV_CONFIG_FILE = "LMCACHE_PLUGIN_CONFIG_FILE"
ENV_CONFIG = "LMCACHE_PLUGIN_CONFIG"
ENV_WORKER_ID = "LMCACHE_PLUGIN_WORKER_ID"
ENV_WORKER_COUNT = "LMCACHE_PLUGIN_WORKER_COUNT"
ENV_PARENT_PID = "LMCACHE_PLUGIN_PARENT_PID"
ENV_NAME = "LMCACHE_PLUGIN_NAME"
ENV_NOTIFY_SOCKET = "NOTIFY_SOCKET"  # sd_notify, as systemd sets it
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"

T = TypeVar("T")

# How often a wait on a call running in a worker thread looks at `stopping`.
_POLL = 0.05

_TYPE_NAMES: dict[type, str] = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a mapping",
}


class PluginEnvironmentError(ValueError):
    """A launcher variable or an ``extra_config`` option is missing or malformed.

    The message names the variable (and the option), so one line tells the operator what to fix.
    """


def log(message: str, *, error: bool = False) -> None:
    """Print one line to stdout (stderr if ``error``), flushed at once.

    The launcher logs every line a plugin prints, prefixed with the plugin's name; flushing keeps
    lines in order and on time even when Python's output is block-buffered.
    """
    print(message, file=sys.stderr if error else sys.stdout, flush=True)


def _script_name() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "plugin"


class _SignalSafeEvent(threading.Event):
    """A threading.Event that a signal handler may set at any moment.

    Python runs signal handlers in the main thread between bytecodes, possibly while that thread is
    inside ``Event.wait`` holding the event's internal lock; with the default non-reentrant lock
    ``set()`` from the handler would then deadlock. A reentrant lock makes that case safe.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cond = threading.Condition(threading.RLock())


@dataclass
class _StopState:
    """The mutable part of a frozen context: the stop event and whether handlers are installed."""

    event: threading.Event = field(default_factory=_SignalSafeEvent)
    handle_signals: bool = False
    installed: bool = False
    signals: int = 0


def _parse_int(name: str, raw: str | None, minimum: int) -> int:
    if raw is None:
        raise PluginEnvironmentError(f"{name}: not set")
    try:
        value = int(raw.strip())
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise PluginEnvironmentError(f"{name}: expected an integer >= {minimum}, got {raw!r}")
    return value


@dataclass(frozen=True)
class PluginContext:
    """Who this plugin serves and with which configuration, as the launcher described it.

    Build it with :meth:`from_env`; construct it directly only in tests.
    """

    role: str
    worker_id: int | None
    worker_count: int
    config: dict[str, Any]
    extra_config: dict[str, Any]
    name: str
    parent_pid: int | None
    notify_socket: str | None = None  # NOTIFY_SOCKET: where notify_* send (None: nowhere)
    watchdog: float | None = None  # seconds within which the launcher expects a pet
    _stop: _StopState = field(default_factory=_StopState, repr=False, compare=False)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, handle_signals: bool | None = None
    ) -> PluginContext:
        """Read and check the ``LMCACHE_PLUGIN_*`` variables (of ``os.environ`` by default).

        All problems are reported together in one :class:`PluginEnvironmentError`. SIGTERM and
        SIGINT handlers that set :attr:`stopping` are installed on its first use, and by default
        only when reading the real environment (tests pass a mapping and keep their handlers).
        """
        env = _with_runtime_names(os.environ if environ is None else environ)
        errors: list[str] = []
        role = (env.get(ENV_ROLE) or "").strip().upper()
        if ENV_ROLE not in env:
            errors.append(f"{ENV_ROLE}: not set")
        elif not role and env[ENV_ROLE]:  # "" is LMCache's MP server (no role); "  " a mistake
            errors.append(f"{ENV_ROLE}: empty")

        def check(fn: Callable[[], T], fallback: T) -> T:
            try:
                return fn()
            except PluginEnvironmentError as exc:
                errors.append(str(exc))
                return fallback

        worker_id = check(lambda: _parse_int(ENV_WORKER_ID, env.get(ENV_WORKER_ID), -1), -1)
        worker_count = check(lambda: _parse_int(ENV_WORKER_COUNT, env.get(ENV_WORKER_COUNT), 1), 1)
        raw_pid = env.get(ENV_PARENT_PID)
        parent_pid: int | None = None
        if raw_pid is not None and raw_pid.strip():
            parent_pid = check(lambda: _parse_int(ENV_PARENT_PID, raw_pid, 1), None)
        config: dict[str, Any] = check(lambda: _parse_config(_config_text(env)), {})
        extra = config.get("extra_config")
        if extra is None:
            extra = {}
        elif not isinstance(extra, dict):
            errors.append(
                f"{ENV_CONFIG}: extra_config must be a JSON object, got {_json_type(extra)}"
            )
            extra = {}
        if errors:
            raise PluginEnvironmentError("; ".join(errors))
        if handle_signals is None:
            handle_signals = environ is None
        watchdog_usec = (env.get(ENV_WATCHDOG_USEC) or "").strip()
        watchdog = int(watchdog_usec) / 1e6 if watchdog_usec.isdigit() and int(
            watchdog_usec) > 0 else None
        return cls(
            role=role,
            worker_id=None if worker_id == -1 else worker_id,
            worker_count=worker_count,
            config=config,
            extra_config=extra,
            name=(env.get(ENV_NAME) or "").strip() or _script_name(),
            parent_pid=parent_pid,
            notify_socket=env.get(ENV_NOTIFY_SOCKET) or None,
            watchdog=watchdog,
            _stop=_StopState(handle_signals=handle_signals),
        )

    # -- options --------------------------------------------------------------------------------

    @overload
    def option(
        self,
        key: str,
        type: type[T],
        default: T,
        *,
        required: bool = ...,
        minimum: float | None = ...,
        maximum: float | None = ...,
    ) -> T: ...

    @overload
    def option(
        self,
        key: str,
        type: type[T],
        *,
        required: Literal[True],
        minimum: float | None = ...,
        maximum: float | None = ...,
    ) -> T: ...

    @overload
    def option(
        self,
        key: str,
        type: type[T],
        *,
        required: bool = ...,
        minimum: float | None = ...,
        maximum: float | None = ...,
    ) -> T | None: ...

    def option(
        self,
        key: str,
        type: type[Any],
        default: Any = None,
        *,
        required: bool = False,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> Any:
        """The ``extra_config[key]`` value, checked against ``type`` and the optional bounds.

        A missing key (or a null value, as a YAML ``key:`` with nothing after it gives) returns
        ``default``, or raises when ``required``. ``bool`` is never taken for ``int``; an integer
        is accepted (and converted) for ``float``. Errors raise :class:`PluginEnvironmentError`
        naming the option.
        """
        where = f"{ENV_CONFIG}: extra_config.{key}"
        expected = _TYPE_NAMES.get(type, f"a {type.__name__}")
        value = self.extra_config.get(key)
        if value is None:
            if required:
                raise PluginEnvironmentError(f"{where} is required ({expected})")
            return default
        ok = isinstance(value, type) and not (isinstance(value, bool) and type is not bool)
        if type is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if ok and (minimum is not None or maximum is not None) and isinstance(value, (int, float)):
            ok = (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
            if minimum is not None and maximum is not None:
                expected += f" from {_num(minimum)} to {_num(maximum)}"
            elif minimum is not None:
                expected += f" >= {_num(minimum)}"
            else:
                expected += f" <= {_num(maximum)}"
        if not ok:
            raise PluginEnvironmentError(f"{where}: expected {expected}, got {value!r}")
        return value

    # -- the process it serves ------------------------------------------------------------------

    def parent_alive(self) -> bool:
        """Whether the process this plugin serves still exists (False when its PID is unknown)."""
        if self.parent_pid is None:
            return False
        try:
            os.kill(self.parent_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # it exists, under another user
        return True

    # -- stopping -------------------------------------------------------------------------------

    @property
    def stopping(self) -> threading.Event:
        """Set when the plugin should stop: on SIGTERM or SIGINT, or by :meth:`stop`.

        The handlers are installed on first use from the main thread, so a plugin that never looks
        at ``stopping`` keeps Python's default behaviour (die on SIGTERM) instead of ignoring it.
        A second signal after the first gets the default behaviour, so a stuck plugin still dies.
        """
        state = self._stop
        if state.handle_signals and not state.installed:
            self._install_signal_handlers()
        return state.event

    def stop(self) -> None:
        """Ask every loop of this plugin to finish (what SIGTERM does)."""
        self._stop.event.set()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may; it will on its first look at `stopping`
        state = self._stop

        def on_signal(signum: int, _frame: object) -> None:
            state.signals += 1
            if state.signals > 1:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            state.event.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self._stop.installed = True

    # -- output ---------------------------------------------------------------------------------

    def log(self, message: str, *, error: bool = False) -> None:
        """Print one flushed line (see :func:`log`); the launcher adds the plugin's name."""
        log(message, error=error)

    # -- readiness and watchdog (sd_notify) ------------------------------------------------------

    def notify(self, message: str) -> bool:
        """Send one sd_notify message (``KEY=VALUE`` lines) to the launcher.  False when there is
        no launcher listening (not started by one with NOTIFY_SOCKET, or it is gone); it never
        raises, so a plugin can call it unconditionally."""
        address = self.notify_socket
        if not address:
            return False
        target = "\0" + address[1:] if address.startswith("@") else address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(message.encode("utf-8", "replace"), target)
        except OSError:
            return False
        return True

    def notify_ready(self, status: str | None = None) -> bool:
        """Tell the launcher this plugin is ready (READY=1), optionally with a status text; a
        ``ready: notify`` plugin is ``starting`` until then."""
        text = "READY=1" if status is None else f"READY=1\nSTATUS={_one_line(status)}"
        return self.notify(text)

    def notify_status(self, text: str) -> bool:
        """Set the status text the launcher shows (``/status``, the status page, /metrics)."""
        return self.notify(f"STATUS={_one_line(text)}")

    def pet_watchdog(self) -> bool:
        """WATCHDOG=1: "still working".  With ``watchdog`` set, the launcher ends the plugin as
        a failure when no pet comes for that long; :meth:`every` pets by itself."""
        return self.notify("WATCHDOG=1") if self.watchdog is not None else False

    def _wait(self, delay: float, pet: bool) -> None:
        """Wait ``delay`` seconds (or until stopping), petting the watchdog at least every half
        period when ``pet``."""
        stopping = self._stop.event
        if not pet or self.watchdog is None:
            stopping.wait(delay)
            return
        step = self.watchdog / 2
        deadline = time.monotonic() + delay
        self.pet_watchdog()
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or stopping.wait(min(step, left)):
                return
            self.pet_watchdog()

    # -- periodic work --------------------------------------------------------------------------

    def every(
        self,
        interval: float,
        fn: Callable[[], object],
        timeout: float | None = None,
        *,
        max_backoff: float | None = None,
    ) -> None:
        """Call ``fn`` now and then every ``interval`` seconds until :attr:`stopping` is set.

        Waits count from the end of a call, so a slow call delays the next one instead of
        overlapping it. An exception from ``fn`` is logged as one line (with the plugin name) and
        the loop goes on. With ``timeout``, ``fn`` runs in a daemon thread and a call still running
        after ``timeout`` seconds is abandoned (Python cannot kill a thread: it finishes, or dies
        with the process) and logged; no new call starts while it is still running. With
        ``max_backoff``, each failure in a row doubles the wait, up to ``max_backoff`` seconds, and
        a success resets it. Returns within a fraction of a second once stopping is set, even
        during a call that has a ``timeout``.

        With a launcher ``watchdog`` (``WATCHDOG_USEC``), it pets the watchdog after each call
        that returned (or raised) and while waiting for the next, at least every half period;
        a call that hangs (or is abandoned or skipped after a ``timeout``) stops the pets, so
        the launcher restarts the hung plugin.
        """
        if not interval > 0:
            raise ValueError(f"every(): interval must be > 0, got {interval!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"every(): timeout must be > 0 or None, got {timeout!r}")
        if max_backoff is not None and not max_backoff >= interval:
            raise ValueError(f"every(): max_backoff must be >= interval, got {max_backoff!r}")
        stopping = self.stopping
        label = getattr(fn, "__name__", None) or repr(fn)
        failures = 0
        straggler: threading.Thread | None = None
        while not stopping.is_set():
            returned = False
            if straggler is not None and straggler.is_alive():
                problem: str | None = "skipped: the previous call is still running"
            else:
                straggler = None
                if timeout is None:
                    problem = _call(fn)
                else:
                    problem, straggler = self._call_with_timeout(fn, timeout)
                    if stopping.is_set():
                        return
                returned = straggler is None
            if problem is None:
                failures = 0
                delay = interval
            else:
                failures += 1
                delay = interval
                if max_backoff is not None:
                    delay = min(interval * 2.0 ** min(failures, 60), max_backoff)
                self.log(
                    f"{self.name}: {label} {problem} (failure {failures} in a row, "
                    f"next call in {delay:g} s)",
                    error=True,
                )
            self._wait(delay, pet=returned)

    def _call_with_timeout(
        self, fn: Callable[[], object], timeout: float
    ) -> tuple[str | None, threading.Thread | None]:
        """Run fn in a daemon thread: the problem (or None), and the thread if still running."""
        outcome: list[str | None] = []
        worker = threading.Thread(
            target=lambda: outcome.append(_call(fn)), name=f"every-{self.name}", daemon=True
        )
        worker.start()
        deadline = time.monotonic() + timeout
        stopping = self._stop.event
        while worker.is_alive() and not stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return f"timed out after {timeout:g} s (abandoned)", worker
            worker.join(min(left, _POLL))
        if worker.is_alive():
            return "interrupted by stop", worker
        return outcome[0] if outcome else "ended without a result", None


def _call(fn: Callable[[], object]) -> str | None:
    """Call fn; None if it returned, else a one-line description of what it raised."""
    try:
        fn()
    except Exception as exc:  # the loop must survive anything the plugin's code raises
        where = ""
        tb = exc.__traceback__
        if not isinstance(exc, OSError) and tb is not None:
            while tb.tb_next is not None:
                tb = tb.tb_next
            code = tb.tb_frame.f_code
            where = f" (at {os.path.basename(code.co_filename)}:{tb.tb_lineno})"
        message = str(exc).replace("\n", " ")  # one line per failure, whatever the message
        return f"failed: {exc.__class__.__name__}: {message}{where}"
    return None


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


def _num(x: float | None) -> str:
    return str(int(x)) if isinstance(x, (int, float)) and float(x).is_integer() else repr(x)


def _json_type(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        value.__class__, "a number" if isinstance(value, (int, float)) else "null"
    )


def _with_runtime_names(env: Mapping[str, str]) -> Mapping[str, str]:
    """LMCache 0.4+ names (``LMCACHE_RUNTIME_PLUGIN_*``) stand in for missing 0.3 ones, so the kit
    works under LMCache's own launcher of either era as well as under ours."""
    missing = {name: env[RUNTIME_PREFIX + name[len(PREFIX):]] for name in
               (ENV_ROLE, ENV_CONFIG, ENV_WORKER_ID, ENV_WORKER_COUNT, ENV_CONFIG_FILE)
               if name not in env and RUNTIME_PREFIX + name[len(PREFIX):] in env}
    return {**env, **missing} if missing else env


def _config_text(env: Mapping[str, str]) -> str | None:
    """The whole configuration: from the file the launcher wrote when it was too large for one
    environment variable (Linux's 128 KiB limit), else from ``LMCACHE_PLUGIN_CONFIG``."""
    path = env.get(ENV_CONFIG_FILE)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as exc:
            raise PluginEnvironmentError(
                f"{ENV_CONFIG_FILE}: cannot read {path}: {exc.strerror}") from None
    return env.get(ENV_CONFIG)


def _parse_config(raw: str | None) -> dict[str, Any]:
    if raw is None:
        raise PluginEnvironmentError(f"{ENV_CONFIG}: not set")
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise PluginEnvironmentError(f"{ENV_CONFIG}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise PluginEnvironmentError(
            f"{ENV_CONFIG}: expected a JSON object, got {_json_type(config)}"
        )
    return config


def run(main: Callable[[PluginContext], int | None]) -> NoReturn:
    """Run a plugin's ``main(ctx)`` with a context from the environment, then exit.

    The exit code is what ``main`` returns (None means 0). A bad environment or option ends the
    plugin with one line on stderr and exit code 2 rather than a traceback.
    """
    name = _script_name()
    try:
        ctx = PluginContext.from_env()
        name = ctx.name
        code = main(ctx)
    except PluginEnvironmentError as exc:
        log(f"{name}: {exc}", error=True)
        sys.exit(2)
    sys.exit(code or 0)
