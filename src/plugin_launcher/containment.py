"""How a plugin is spawned and contained: a cgroup per run where writable, else its session.

No ``preexec_fn`` and no ``fork()`` of the host: ``Popen`` (vfork/posix_spawn, a cost that does
not grow with the host's memory) runs a tiny exec'd stage that prepares the child before the
plugin's first instruction, then execs the plugin in the same process (same PID)::

    setpriv --pdeathsig KILL -- /bin/sh -c '<prologue>' plugin-launcher PLUGIN ARGV...

The prologue checks that its parent is still the host (else the host died before PDEATHSIG was
set: exit), joins the run's cgroups (exit if they are gone: the host died and the guardian
removed them), sets the rlimits with ``ulimit`` and execs the plugin.  ``nice`` is set by the
host while the prologue waits at its gate (process.spawn): no exec of ``nice`` per plugin.
Everything is decided here in the host, once per launcher; ``list`` shows it.
"""

from __future__ import annotations

import errno
import itertools
import os
import resource
import shlex
import shutil
import stat
import time
from dataclasses import dataclass, field

from . import cgroups, limits
from .options import PluginOptions

ENV_VAR = "PLUGIN_LAUNCHER_CONTAINMENT"  # auto (default) | cgroup2 | cgroup1 | session
CHOICES = ("auto", "cgroup2", "cgroup1", "session")
V1_KILL_CONTROLLERS = ("freezer", "pids")  # then any named hierarchy (name=...)
SHELL = "/bin/sh"
NO_SHELL = "process group only (no /bin/sh)"
EXIT_HOST_GONE = 125
EXIT_NO_CGROUP = 126
_serial = itertools.count()


@dataclass(frozen=True)
class Hierarchy:
    kind: str  # "cgroup2", or the v1 hierarchy's key in /proc/self/cgroup ("freezer", "name=x")
    path: str  # our own cgroup in it: where plugin-launcher/ goes


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fstype, super options) of every cgroup mount."""
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fstype, _source, opts = (right.split() + ["", "", ""])[:3]
                if fstype in ("cgroup", "cgroup2"):
                    found.append((left.split()[4], fstype, opts))
    except OSError:
        pass
    return found


def _own_paths() -> dict[str, str]:
    """Our cgroup per hierarchy key ("" for v2, "freezer", "cpu,cpuacct", "name=systemd")."""
    own = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _id, keys, path = line.rstrip("\n").split(":", 2)
                own[keys] = path
    except OSError:
        pass
    return own


def hierarchies() -> list[Hierarchy]:
    """The cgroup hierarchies mounted here, in order of preference for ending a plugin: v2
    (``cgroup.kill``), v1 freezer (freeze, kill, thaw), v1 pids, v1 named; plus v1 memory."""
    own = _own_paths()
    found = []
    for mount, fstype, opts in _mounts():
        if fstype == "cgroup2":
            kind, key = "cgroup2", ""
        else:
            names = [o for o in opts.split(",")
                     if o in (*V1_KILL_CONTROLLERS, "memory") or o.startswith("name=")]
            key = next((k for k in own if k and set(k.split(",")) & set(names)), "")
            if not names or not key:
                continue
            kind = key
        if key not in own:
            continue
        found.append(Hierarchy(kind, os.path.normpath(mount + own[key])))
    rank = {"cgroup2": 0, "freezer": 1, "pids": 2}
    return sorted(found, key=lambda h: rank.get(h.kind, 3))


def _stale(name: str) -> bool:
    """A launcher folder ``PID-STARTTIME-N`` whose process is gone (or is another process)."""
    pid, _, rest = name.partition("-")
    start = rest.partition("-")[0]
    return not pid.isdigit() or _start_time(int(pid)) != start


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


def _make_base(h: Hierarchy) -> str | None:
    """``<our cgroup>/plugin-launcher`` if we may create cgroups there; stale launcher folders
    (their host died with everything else) are killed and removed on the way."""
    base = os.path.join(h.path, cgroups.BASE_NAME)
    try:
        os.makedirs(base, exist_ok=True)
        for name in os.listdir(base):
            folder = os.path.join(base, name)
            if os.path.isdir(folder) and _stale(name):
                cgroups.sweep(folder, 0.5)
    except OSError:
        return None
    return base if os.access(base, os.W_OK) else None


@dataclass
class Containment:
    """What one launcher uses to hold its plugins; ``roots`` go to the guardian."""

    mechanism: str  # "cgroup v2" | "cgroup v1 freezer" | ... | "session ID"
    roots: list[str] = field(default_factory=list)  # launcher folders (kill first, memory last)
    memory_root: str | None = None  # where memory_max is a memory controller limit
    setpriv: str | None = None
    uses_prologue: bool = True  # False where /bin/sh is missing: plugins are exec'd directly
    _runs: itertools.count[int] = field(default_factory=itertools.count)
    _reserved: dict[str, tuple[str, ...]] = field(default_factory=dict)  # see reserve()

    @classmethod
    def detect(cls, choice: str | None = None) -> Containment:
        """The best mechanism this machine lets us use (``PLUGIN_LAUNCHER_CONTAINMENT`` may
        ask for a weaker one: ``session``, ``cgroup1``)."""
        choice = (choice or os.environ.get(ENV_VAR) or "auto").strip().lower()
        if choice not in CHOICES:
            choice = "auto"
        me = f"{os.getpid()}-{_start_time(os.getpid())}-{next(_serial)}"
        if not os.access(SHELL, os.X_OK):  # a distroless or scratch image: no prologue at all
            return cls(NO_SHELL, uses_prologue=False)
        self = cls("session ID", setpriv=shutil.which("setpriv"))
        if choice == "session":
            return self
        found = hierarchies()
        kill = [h for h in found if h.kind != "memory" and
                (choice == "auto" or (h.kind == "cgroup2") == (choice == "cgroup2"))]
        for h in kill:
            base = _make_base(h)
            if base is None:
                continue
            root = os.path.join(base, me)
            try:
                os.mkdir(root)
            except OSError:
                continue
            self.roots.append(root)
            self.mechanism = "cgroup v2" if h.kind == "cgroup2" else f"cgroup v1 {h.kind}"
            if h.kind == "cgroup2" and _enable_memory(base, root):
                self.memory_root = root
            break
        if self.roots and self.memory_root is None:
            memory = next((h for h in found if h.kind == "memory"), None)
            base = _make_base(memory) if memory is not None else None
            if base is not None:
                root = os.path.join(base, me)
                try:
                    os.mkdir(root)
                    self.roots.append(root)
                    self.memory_root = root
                except OSError:
                    pass
        return self

    def describe(self) -> str:
        """One line for ``list``: which mechanism holds a plugin's processes."""
        if not self.uses_prologue:
            return (f"process group only: {SHELL} is missing, so plugins start without the "
                    "prologue (no cgroup, no PDEATHSIG; a plugin with limits cannot start)")
        if self.roots:
            what = (f"{self.mechanism} (one cgroup per run, killed as one; "
                    f"under {os.path.dirname(self.roots[0])})")
        else:
            what = ("session ID (process group plus every process of the plugin's session; "
                    "daemons that call setsid escape; no writable cgroup hierarchy)")
        if self.roots:
            death = "no PDEATHSIG needed (the cgroup holds every process of a run)"
        elif self.setpriv:
            death = "PDEATHSIG on each plugin"
        else:
            death = "no setpriv: no PDEATHSIG (the guardian alone ends plugins if the host dies)"
        return f"{what}; {death}"

    def reserve(self, runs: list[tuple[str, PluginOptions]]) -> None:
        """Make the cgroups of a batch of runs (``(key, options)`` each) now, in one go: a
        ``mkdir`` in a cgroup file system waits for every plugin that is joining its cgroup at
        that moment, so making them between the spawns of a batch costs ten times as much.
        ``prepare(options, key)`` then hands them out; ``release()`` removes those left."""
        if self.roots:
            for key, options in runs:
                self._reserved[key] = self._make(options)

    def release(self) -> None:
        """Remove the reserved cgroups no run took (a plugin that went to standby)."""
        for cages in self._reserved.values():
            for path in cages:
                cgroups.remove(path)
        self._reserved.clear()

    def prepare(self, options: PluginOptions, key: str | None = None) -> tuple[str, ...]:
        """The cgroups of the next run, made before it is spawned (no window); () if none."""
        if key is not None and key in self._reserved:
            return self._reserved.pop(key)
        return self._make(options) if self.roots else ()

    def _make(self, options: PluginOptions) -> tuple[str, ...]:
        name = f"run{next(self._runs)}"
        made = []
        for root in self.roots:
            if root == self.memory_root and root != self.roots[0] and options.memory_max is None:
                continue  # a hierarchy of its own that only carries memory_max: not needed
            path = os.path.join(root, name)
            try:
                os.mkdir(path)
            except FileExistsError:
                pass
            except OSError:
                continue
            made.append(path)
        if self.memory_root is not None and options.memory_max is not None:
            path = os.path.join(self.memory_root, name)
            if path in made:
                set_memory_limit(path, options.memory_max)
        return tuple(made)

    def command(self, argv: list[str], options: PluginOptions, cages: tuple[str, ...],
                host_pid: int, gate: bool = False) -> list[str]:
        """The argv that runs ``argv`` contained (see the module docstring); ``gate``: wait for
        one line on stdin first (process.spawn), then make stdin /dev/null."""
        if not self.uses_prologue:
            if options.has_limits:
                raise OSError(errno.ENOENT, f"{SHELL} is missing, and it sets the limits "
                              f"({limits.describe(options)})", SHELL)
            return list(argv)
        script = prologue([os.path.join(c, "cgroup.procs") for c in cages],
                          ulimit_commands(options),
                          host_pid if self.setpriv and not cages else None, gate)
        chain = [SHELL, "-c", script, "plugin-launcher", *argv]
        if self.setpriv and not cages:
            # Only where no cgroup holds the run: a cgroup is swept whole (by the guardian, the
            # watchman, or the next launcher), and it sits inside the host's own cgroup, which
            # a container or service stop kills with everything below it.
            chain = [self.setpriv, "--pdeathsig", "KILL", "--", *chain]
        return chain

    def close(self) -> None:
        """The launcher stopped: remove its cgroups (every plugin has already ended)."""
        for root in self.roots:
            cgroups.sweep(root, 1.0)


def _enable_memory(base: str, root: str) -> bool:
    """cgroup v2: the memory controller for our runs, if our parent already offers it (we never
    change the host's own cgroup: the "no internal processes" rule would forbid it anyway)."""
    for folder in (base, root):
        try:
            with open(os.path.join(folder, "cgroup.controllers")) as f:
                if "memory" not in f.read().split():
                    return False
            with open(os.path.join(folder, "cgroup.subtree_control"), "w") as f:
                f.write("+memory")
        except OSError:
            return False
    return True


def set_memory_limit(path: str, limit: int) -> bool:
    for name in ("memory.max", "memory.limit_in_bytes"):
        target = os.path.join(path, name)
        if os.path.exists(target):
            try:
                with open(target, "w") as f:
                    f.write(str(limit))
                return True
            except OSError:
                return False
    return False


def prologue(procs_files: list[str], ulimits: list[str], host_pid: int | None,
             gate: bool = False) -> str:
    """The ``sh -c`` script run in the child before the plugin (pure; table-tested)."""
    steps = []
    if gate:  # the host writes a line once the guardian knows us; end-of-file: the host died
        steps.append(f"read -r _ || exit {EXIT_HOST_GONE}; exec </dev/null")
    if host_pid is not None:  # PDEATHSIG is set: if the host died before that, nobody will end us
        steps.append(f'[ "$PPID" = {host_pid} ] || exit {EXIT_HOST_GONE}')
    steps += [f"echo $$ > {shlex.quote(f)} || exit {EXIT_NO_CGROUP}" for f in procs_files]
    steps += [f"{u} || exit {EXIT_NO_CGROUP}" for u in ulimits]
    steps.append('exec "$@"')
    return "; ".join(steps)


def _clamp(limit: int, value: int, extra: int = 0) -> tuple[int, int]:
    """(soft, hard) for ``value`` within the host's own hard limit (children inherit it)."""
    _soft, hard = resource.getrlimit(limit)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
        return value, min(value + extra, hard)
    return value, value + extra


def ulimit_commands(options: PluginOptions) -> list[str]:
    """rlimits as ``ulimit`` builtins of ``/bin/sh`` (no extra exec): RLIMIT_AS (KiB),
    RLIMIT_NOFILE, RLIMIT_CPU (SIGXCPU at the soft limit, SIGKILL one second later)."""
    commands = []
    plugins_soft = limits.plugins_open_files()
    if options.open_files_max is None and plugins_soft is not None:
        commands.append(f"ulimit -S -n {plugins_soft}")  # what it had before we raised ours
    if options.memory_max is not None:
        soft, _hard = _clamp(resource.RLIMIT_AS, options.memory_max)
        commands.append(f"ulimit -v {max(1, soft // 1024)}")
    if options.open_files_max is not None:
        soft, _hard = _clamp(resource.RLIMIT_NOFILE, options.open_files_max)
        commands.append(f"ulimit -n {soft}")
    if options.cpu_time_max is not None:
        soft, hard = _clamp(resource.RLIMIT_CPU, options.cpu_time_max, 1)
        commands.append(f"ulimit -S -t {soft} && ulimit -H -t {hard}")  # soft first (dash)
    return commands


CHECK_TRUSTED = 1.0  # seconds a passed check_executable is trusted: a batch shares one check
_checked: dict[tuple[str, str | None], float] = {}


def check_executable(argv0: str, env: dict[str, str]) -> None:
    """Raise what ``Popen`` would for a program that cannot be executed, so a missing or
    non-executable interpreter is still "cannot start X: ..." rather than an exit code 127."""
    key = (argv0, env.get("PATH"))
    now = time.monotonic()
    if now - _checked.get(key, -CHECK_TRUSTED) < CHECK_TRUSTED:
        return
    _check_executable(argv0, env)
    if len(_checked) > 256:
        _checked.clear()
    _checked[key] = now


def _check_executable(argv0: str, env: dict[str, str]) -> None:
    path = argv0 if "/" in argv0 else shutil.which(argv0, path=env.get("PATH", os.defpath))
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), argv0)
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), argv0)
    if not _looks_executable(path):
        # execve() would fail with ENOEXEC; the prologue's shell would instead run it as a script
        raise OSError(errno.ENOEXEC, os.strerror(errno.ENOEXEC), argv0)


def _looks_executable(path: str) -> bool:
    """An ELF binary or a ``#!`` script: what execve() runs (binfmt_misc formats aside)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return True  # let exec itself say why
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return True
        head = os.read(fd, 4)
    except OSError:
        return True
    finally:
        os.close(fd)
    return head.startswith((b"#!", b"\x7fELF"))
