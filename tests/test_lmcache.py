"""The LMCache face, proven against LMCache's own code (0.5.6 and 0.3.10 from PyPI).

Each release is installed once with ``pip --no-deps --only-binary=:all: --target`` into
``.lmcache-releases/`` (skipped visibly where no wheel fits this Python).  For every process of
the matrix (scheduler, tensor-parallel ranks 0-3 of 4, the MP server) LMCache's own call site runs
twice on the same plugin folder, in fresh processes: once as LMCache ships it, once with
``plugin_launcher.lmcache.install()``; the test compares which plugins ran and what each saw.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import PYTHON, alive, safe_dir, wait_for

ROOT = Path(__file__).resolve().parent.parent
COMPAT = Path(__file__).resolve().parent / "lmcache_compat"
CACHE = Path(os.environ.get("PLUGIN_LAUNCHER_LMCACHE_CACHE", ROOT / ".lmcache-releases"))
TAG = f"py{sys.version_info[0]}{sys.version_info[1]}"

DUMP = r'''
import json, os, sys, tempfile
keys = [k for k in os.environ if k.startswith(("LMCACHE_PLUGIN_", "LMCACHE_RUNTIME_PLUGIN_"))]
data = {k: os.environ[k] for k in keys}
data["pid"] = int(os.environ.get("PLUGIN_PID") or os.getpid())  # bash passes $$
name = os.path.basename(sys.argv[1])
out = os.environ["PLUGIN_TEST_OUT"]
fd, tmp = tempfile.mkstemp(dir=out, suffix=".tmp")
with os.fdopen(fd, "w") as f:
    json.dump(data, f)
os.rename(tmp, os.path.join(out, name + ".json"))
'''
BASH = '#!/bin/bash\nPLUGIN_PID=$$ python3 "$PLUGIN_TEST_DUMP" "$0"\nexec sleep 60\n'
PY = ('import os, runpy, sys, time\nsys.argv = ["dump", __file__]\n'
      'runpy.run_path(os.environ["PLUGIN_TEST_DUMP"])\n')
PY_SLEEP = PY + "time.sleep(60)\n"

# Written the way LMCache's examples are (examples/plugins, runtime_plugins, mp_runtime_plugins).
EXAMPLE_BASH = '''#!/bin/bash
role="$LMCACHE_RUNTIME_PLUGIN_ROLE"
worker_id="$LMCACHE_RUNTIME_PLUGIN_WORKER_ID"
worker_count="$LMCACHE_RUNTIME_PLUGIN_WORKER_COUNT"
config="$LMCACHE_RUNTIME_PLUGIN_CONFIG"
echo "All plugin started for role: $role, worker ID: $worker_id, worker count: $worker_count"
case "$config" in *xyz-123*) echo "All plugin sees marker xyz-123";; esac
''' + BASH.split("\n", 1)[1]
EXAMPLE_SCHEDULER = '''import json, os
role = os.getenv("LMCACHE_RUNTIME_PLUGIN_ROLE")
try:
    config = json.loads(os.getenv("LMCACHE_RUNTIME_PLUGIN_CONFIG"))
except TypeError:  # LMCache 0.3 sets only LMCACHE_PLUGIN_*; the drop-in sets both
    config = {"extra_config": {}}
marker = (config.get("extra_config") or {}).get("marker")
print(f"Python plugin running with role: {role}, marker: {marker}")
''' + PY_SLEEP
EXAMPLE_MP = '''import json, os
config = json.loads(os.getenv("LMCACHE_RUNTIME_PLUGIN_CONFIG", "{}"))
mp = config.get("mp_config", {})
extra = config.get("runtime_plugin_extra_config") or {}
http = config.get("http_config") or {}
print("[mp_plugin] MP server: host=%s port=%s" % (mp.get("host"), mp.get("port")))
print("[mp_plugin] frontend heartbeat %s http port %s"
      % (extra.get("plugin.frontend.heartbeat_url"), http.get("http_port")))
''' + PY_SLEEP

FILES = {
    "all_plugin.sh": EXAMPLE_BASH,
    "scheduler_foo_plugin.py": EXAMPLE_SCHEDULER,
    "mp_plugin.py": EXAMPLE_MP,
    "worker_0_test.sh": BASH,
    "worker_2_x.py": PY_SLEEP,
    "worker_foo.sh": BASH,
    "worker_0.sh": BASH,
    "ALL_caps.sh": BASH,
    "heartbeat.py": PY_SLEEP,  # no '_': LMCache runs it on every role
    "scheduler.py": PY_SLEEP,  # no '_': LMCache runs it on every role
    ".hidden/all_hidden.sh": BASH,  # LMCache's rglob enters hidden folders
    "all_upper.PY": "#!/usr/bin/env python3\n" + PY_SLEEP,  # LMCache's rglob is case-sensitive
    "all_insecure.sh": BASH,  # group and world writable: refused
}


@functools.cache
def release(version: str) -> Path | str:
    """The folder holding LMCache ``version``, or why it cannot be had here."""
    target = CACHE / f"lmcache-{version}-{TAG}"
    if (target / "lmcache" / "__init__.py").exists():
        return target
    staging = CACHE / f".staging-{version}-{TAG}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    result = subprocess.run(
        [PYTHON, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
         "--only-binary=:all:", "--target", str(staging), f"lmcache=={version}"],
        capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        return f"LMCache {version} cannot be installed for Python {TAG[2:]} here: {last}"
    staging.rename(target)
    return target


def need(version: str) -> Path:
    found = release(version)
    if isinstance(found, str):
        pytest.skip(found)
    return found


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = safe_dir(tmp_path_factory.mktemp("lmcache") / "base")
    (base / "dump.py").write_text(DUMP)
    plugins = safe_dir(base / "plugins")
    for name, text in FILES.items():
        path = plugins / name
        safe_dir(path.parent)
        path.write_text(text)
        path.chmod(0o755)
    (plugins / "all_insecure.sh").chmod(0o777)
    return plugins


def drive(version: str, site: str, mode: str, role: str, worker_id: int, count: int,
          plugins: Path, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / f"{mode}-{site}-{role}-{worker_id}"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(need(version)), str(COMPAT), str(ROOT / "src")])
    env["PATH"] = os.pathsep.join([os.path.dirname(PYTHON), env.get("PATH", "/usr/bin:/bin")])
    env["PLUGIN_TEST_DUMP"] = str(plugins.parent / "dump.py")
    wrapper = [PYTHON, "-m", "plugin_launcher.lmcache"] if mode == "wrapped" else []
    result = subprocess.run(
        [*wrapper, PYTHON, str(COMPAT / "driver.py"), version, site, mode, role, str(worker_id),
         str(count), str(plugins), str(out)],
        capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    report["stderr"] = result.stderr
    for data in report["plugins"].values():
        wait_for(lambda pid=data["pid"]: not alive(pid), 10, message=f"plugin {data['pid']} gone")
    return report


def expected_differences(role: str, worker_id: int) -> tuple[set[str], set[str]]:
    """(run by LMCache only, run by plugin-launcher only), as the README's table says."""
    lmcache_only = {"all_hidden.sh", "all_insecure.sh"}
    if role != "None":
        lmcache_only.add("heartbeat.py")
        if role != "scheduler":
            lmcache_only.add("scheduler.py")
    return lmcache_only, {"all_upper.PY"}


MATRIX = [("scheduler", -1), ("worker", 0), ("worker", 1), ("worker", 2), ("worker", 3)]
CASES = ([("0.5.6", "factory", role, wid) for role, wid in MATRIX]
         + [("0.5.6", "mp", "None", 0)]
         + [("0.3.10", "adapter", role, wid) for role, wid in MATRIX])


@pytest.mark.parametrize(("version", "site", "role", "worker_id"), CASES)
def test_lmcache_call_site_runs_the_drop_in_with_the_same_selection_and_environment(
    version: str, site: str, role: str, worker_id: int, folder: Path, tmp_path: Path
) -> None:
    own = drive(version, site, "lmcache", role, worker_id, 4, folder, tmp_path)
    ours = drive(version, site, "drop-in", role, worker_id, 4, folder, tmp_path)
    assert own["class"].startswith("lmcache.v1.plugin.")
    assert ours["class"] in ("plugin_launcher.lmcache.RuntimePluginLauncher",
                             "plugin_launcher.lmcache.PluginLauncher")

    # Selection: equal but for the documented differences, each named by one warning.
    lmcache_only, ours_only = expected_differences(role, worker_id)
    assert set(own["plugins"]) - set(ours["plugins"]) == lmcache_only
    assert set(ours["plugins"]) - set(own["plugins"]) == ours_only
    for name in lmcache_only | ours_only:
        assert [w for w in ours["warnings"] if name in w], (name, ours["warnings"])
    assert len(ours["warnings"]) == len(lmcache_only | ours_only), ours["warnings"]

    # Environment: what that release gave each plugin, byte for byte.
    for name in set(own["plugins"]) & set(ours["plugins"]):
        theirs, mine = own["plugins"][name], ours["plugins"][name]
        for key, value in theirs.items():
            if key == "pid":
                continue
            if key == "LMCACHE_PLUGIN_ROLE" and version < "0.4":
                # 0.3.10 passed str(KVConnectorRole.WORKER); its documentation promised WORKER
                assert value == f"KVConnectorRole.{role.upper()}"
                assert mine[key] == role.upper()
            else:
                assert mine[key] == value, (name, key)
        for key in ("ROLE", "WORKER_ID", "WORKER_COUNT", "CONFIG"):  # both spellings, always
            assert mine[f"LMCACHE_RUNTIME_PLUGIN_{key}"] == mine[f"LMCACHE_PLUGIN_{key}"]
    config = json.loads(next(iter(ours["plugins"].values()))["LMCACHE_PLUGIN_CONFIG"])
    assert config.get("extra_config", config.get("runtime_plugin_extra_config"))["marker"] == (
        "xyz-123")


def test_example_style_plugins_see_their_config_through_lmcaches_logger(
    folder: Path, tmp_path: Path
) -> None:
    """Plugins written like LMCache's examples read their values; their lines reach LMCache's
    logger (its format on stderr) although the process configured no logging of its own."""
    worker = drive("0.5.6", "factory", "drop-in", "scheduler", -1, 4, folder, tmp_path)
    lines = [line for line in worker["stderr"].splitlines() if "LMCache INFO" in line]
    assert any("[all_plugin.sh] All plugin sees marker xyz-123" in line for line in lines)
    assert any("[all_plugin.sh] All plugin started for role: scheduler, worker ID: -1, "
               "worker count: 4" in line for line in lines)
    assert any("[scheduler_foo_plugin.py] Python plugin running with role: scheduler, "
               "marker: xyz-123" in line for line in lines)
    mp = drive("0.5.6", "mp", "drop-in", "None", 0, 1, folder, tmp_path)
    text = mp["stderr"]
    assert "[mp_plugin.py] [mp_plugin] MP server: host=localhost port=5555" in text
    assert "[mp_plugin.py] [mp_plugin] frontend heartbeat http://127.0.0.1:1/hb http port 8085" \
        in text


@pytest.mark.parametrize(("version", "site", "role"), [("0.5.6", "factory", "worker"),
                                                      ("0.5.6", "mp", "None"),
                                                      ("0.3.10", "adapter", "worker")])
def test_no_code_route_installs_the_drop_in_in_an_unmodified_process(
    version: str, site: str, role: str, folder: Path, tmp_path: Path
) -> None:
    """`plugin-launcher-lmcache COMMAND`: nothing in the process imports plugin_launcher."""
    report = drive(version, site, "wrapped", role, 1, 4, folder, tmp_path)
    assert report["class"].startswith("plugin_launcher.lmcache.")
    assert "all_plugin.sh" in report["plugins"]
