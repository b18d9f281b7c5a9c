"""Launch cost against the host's memory (issue 11): 100 plugins, with and without limits, from a
host with 0, 4 and 12 GB of resident (touched) memory, each next to a bare ``Popen`` loop in the
same process and run.  A ``preexec_fn`` loop (what limits used before) shows what fork() costs,
and a loop of the contained command lines (the prologue alone) what containment costs.

    .venv/bin/python benchmarks/launch_memory.py                 # 0, 4 and 12 GB, 3 runs each
    .venv/bin/python benchmarks/launch_memory.py --sizes 0 1 --repeat 1 --plugins 20

Each size runs in a fresh child process (so memory is given back between sizes).  Goal: the
launcher (with or without limits) at most 1.2x the bare Popen loop at every size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GOAL = 1.2
PAGE = 4096


def touch(gigabytes: float) -> bytearray:
    """``gigabytes`` of resident memory: allocated and every page written."""
    block = bytearray(int(gigabytes * (1 << 30)))
    for offset in range(0, len(block), PAGE):
        block[offset] = 1
    return block


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / (1 << 30)


def end(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def bare_popen(commands: list[list[str]], preexec: bool = False) -> float:
    def limit() -> None:  # what limits.preexec_for did: forces fork() of the host
        os.setpriority(os.PRIO_PROCESS, 0, 10)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    start = time.perf_counter()
    procs = [subprocess.Popen(c, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
                              preexec_fn=limit if preexec else None) for c in commands]
    elapsed = time.perf_counter() - start
    end([p.pid for p in procs])
    for p in procs:
        p.wait()
        for pipe in (p.stdout, p.stderr):
            if pipe is not None:
                pipe.close()
    return elapsed


def contained_popen(commands: list[list[str]]) -> float:
    """The bare loop with each command run through the launcher's containment prologue (its
    cgroup made beforehand): what containment alone costs, with no launcher around it."""
    from plugin_launcher.containment import Containment
    from plugin_launcher.options import PluginOptions

    containment = Containment.detect()
    options = PluginOptions()
    contained = [containment.command(c, options, containment.prepare(options), os.getpid())
                 for c in commands]
    try:
        return bare_popen(contained)
    finally:
        containment.close()


def launcher(folder: Path, n: int, limits: bool) -> float:
    from plugin_launcher import PluginLauncher

    default: dict[str, Any] = {"stop_timeout": 1.0}
    if limits:
        default.update(nice=10, memory_max="2G", open_files_max=256, cpu_time_max=3600)
    config = {"plugin_locations": [str(folder)], "plugin_options": {"default": default}}
    start = time.perf_counter()  # what the caller pays: the construction too
    pl = PluginLauncher(config, role="worker")
    pl.launch_plugins()
    deadline = time.monotonic() + 60
    while sum(1 for p in pl.plugins if p.pid is not None) < n:
        if time.monotonic() > deadline:
            raise SystemExit("plugins did not start")
        time.sleep(0.001)
    elapsed = time.perf_counter() - start
    pl.stop_plugins(timeout=1.0)
    return elapsed


def one_size(gigabytes: float, n: int, repeat: int) -> dict[str, Any]:
    ballast = touch(gigabytes)
    resident = rss_gb()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "plugins"
        folder.mkdir(mode=0o755)
        for i in range(n):
            path = folder / f"worker_{i:03}.sh"
            path.write_text("#!/bin/sh\nexec sleep 1000\n")
            path.chmod(0o755)
        commands = [["/bin/sh", str(p)] for p in sorted(folder.iterdir())]
        samples: dict[str, list[float]] = {k: [] for k in
                                           ("popen", "preexec", "launcher", "limits", "floor")}
        for _ in range(repeat):
            samples["popen"].append(bare_popen(commands))
            samples["floor"].append(contained_popen(commands))
            samples["launcher"].append(launcher(folder, n, False))
            samples["limits"].append(launcher(folder, n, True))
            samples["preexec"].append(bare_popen(commands, preexec=True))
    medians = {k: statistics.median(v) for k, v in samples.items()}
    del ballast
    return {"gigabytes": gigabytes, "rss_gb": round(resident, 2), "plugins": n,
            "samples": samples, "medians": medians,
            "ratios": {k: medians[k] / medians["popen"]
                       for k in ("launcher", "limits", "preexec", "floor")}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0, 4, 12])
    parser.add_argument("--plugins", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_size(args.one, args.plugins, args.repeat)))
        return 0
    results = []
    for size in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(size), "--plugins",
                              str(args.plugins), "--repeat", str(args.repeat)],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(f"size {size} GB failed: {out.stderr.strip()}", file=sys.stderr)
            return 1
        results.append(json.loads(out.stdout))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"launch {args.plugins} plugins, medians of {args.repeat}; ratio = over a bare Popen "
          f"loop in the same run; goal <= {GOAL}x")
    print(f"{'host RSS':>9} {'Popen':>8} {'launcher':>9} {'ratio':>6} {'limits':>8} {'ratio':>6}"
          f" {'preexec_fn':>10} {'ratio':>6} {'contained':>9} {'ratio':>6}  met")
    met_all = True
    for r in results:
        m, q = r["medians"], r["ratios"]
        met = q["launcher"] <= GOAL and q["limits"] <= GOAL
        met_all &= met
        print(f"{r['rss_gb']:>7.1f}GB {m['popen'] * 1e3:>6.0f}ms {m['launcher'] * 1e3:>7.0f}ms "
              f"{q['launcher']:>5.2f}x {m['limits'] * 1e3:>6.0f}ms {q['limits']:>5.2f}x "
              f"{m['preexec'] * 1e3:>8.0f}ms {q['preexec']:>5.2f}x {m['floor'] * 1e3:>7.0f}ms "
              f"{q['floor']:>5.2f}x  {'yes' if met else 'NO'}")
    print("goal met at every size" if met_all else "goal NOT met at some size")
    print("contained: the bare loop with each command run through the containment prologue "
          "alone (no launcher): the floor of any exec'd prologue on this machine")
    return 0  # figures, not a test: goals are reported, never asserted


if __name__ == "__main__":
    sys.exit(main())
