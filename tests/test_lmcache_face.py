"""The LMCache face without LMCache installed: what it accepts, what plugins see, how it is put in
place and taken out again, and what it costs LMCache's shutdown."""

from __future__ import annotations

import enum
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    CLI,
    PYTHON,
    LogRecorder,
    ProcessTracker,
    alive,
    read_pids,
    wait_for,
    write_plugin,
)

import plugin_launcher
from plugin_launcher import lmcache, lmcache_hook
from plugin_launcher.identity import DEFAULT_WORKER_COUNT, DEFAULT_WORKER_ID
from plugin_launcher.lmcache import (
    PluginLauncher,
    RuntimePluginLauncher,
    lmcache_would_run,
    role_values,
    worker_count_value,
    worker_id_value,
)

SRC = str(Path(plugin_launcher.__file__).resolve().parent.parent)
ENV_DUMP = """#!/bin/bash
for v in ROLE WORKER_ID WORKER_COUNT; do
  a="LMCACHE_PLUGIN_$v"; b="LMCACHE_RUNTIME_PLUGIN_$v"
  echo "$v=${!a}|${!b}"
done
echo "ready"
exec sleep 30
"""


class KVConnectorRole(enum.Enum):
    SCHEDULER = 0
    WORKER = 1


@pytest.fixture
def face_launchers() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for launcher in made:
        launcher.stop_plugins(1.0)


@pytest.mark.parametrize(("role", "expected"), [
    (None, (None, "", None)),
    ("worker", ("WORKER", "worker", None)),
    ("Scheduler", ("SCHEDULER", "Scheduler", None)),
    (KVConnectorRole.WORKER, ("WORKER", "WORKER", None)),
    ("kv_both", ("", "kv_both", "role 'kv_both' cannot match any file name (it contains '_', "
                 "'/' or a space)")),
    ("", ("", "", "role '' is empty")),
    (3, ("", "3", "role 3 is not a string, an Enum or None")),
])
def test_role_values(role: Any, expected: tuple[Any, ...]) -> None:
    assert role_values(role) == expected


@pytest.mark.parametrize(("value", "expected"), [
    (-1, (None, None)), (None, (None, None)), (0, (0, None)), (7, (7, None)),
    (-2, (None, "worker_id -2 is not an integer >= -1")),
    (True, (None, "worker_id True is not an integer >= -1")),
    ("1", (None, "worker_id '1' is not an integer >= -1")),
])
def test_worker_id_values(value: Any, expected: tuple[Any, ...]) -> None:
    assert worker_id_value(value) == expected


@pytest.mark.parametrize(("value", "expected"), [
    (4, (4, None)), (None, (1, None)), (0, (1, "worker_count 0 is not an integer >= 1")),
    (2.0, (1, "worker_count 2.0 is not an integer >= 1")),
])
def test_worker_count_values(value: Any, expected: tuple[Any, ...]) -> None:
    assert worker_count_value(value) == expected


@pytest.mark.parametrize(("name", "role", "worker", "runs"), [
    ("heartbeat.py", "WORKER", 0, True),        # no '_': everywhere in LMCache
    ("scheduler.py", "WORKER", 0, True),
    ("worker_0_test.sh", "WORKER", 0, True),
    ("worker_0_test.sh", "WORKER", 1, False),
    ("worker_0.sh", "WORKER", 1, True),          # two parts: no worker ID
    ("scheduler_0_x.sh", "SCHEDULER", None, False),  # the scheduler is worker -1
    ("mp_plugin.py", "WORKER", 0, False),
    ("mp_plugin.py", None, 0, True),             # the MP server: no filtering at all
    ("ALL_x.sh", "SCHEDULER", None, True),
    ("worker_\u00b2_x.sh", "WORKER", 2, False),  # '²'.isdigit() but int() refuses it
])
def test_lmcaches_own_name_rule(name: str, role: str | None, worker: int | None,
                                runs: bool) -> None:
    assert lmcache_would_run(name, role, worker) is runs


def env_lines(recorder: LogRecorder, name: str) -> dict[str, str]:
    lines = recorder.output(name)
    return dict(line.split("=", 1) for line in lines if "=" in line)


@pytest.mark.parametrize(("cls", "role", "count", "worker", "expected"), [
    # LMCache calls (config, role, worker_count, worker_id): the positional order matters
    (RuntimePluginLauncher, "worker", 4, 1, {"ROLE": "worker|worker", "WORKER_ID": "1|1",
                                             "WORKER_COUNT": "4|4"}),
    (RuntimePluginLauncher, "scheduler", 4, -1, {"ROLE": "scheduler|scheduler",
                                                 "WORKER_ID": "-1|-1", "WORKER_COUNT": "4|4"}),
    (RuntimePluginLauncher, None, 1, 0, {"ROLE": "|", "WORKER_ID": "0|0",
                                         "WORKER_COUNT": "1|1"}),
    (PluginLauncher, KVConnectorRole.WORKER, 2, 7, {"ROLE": "WORKER|WORKER", "WORKER_ID": "7|7",
                                                    "WORKER_COUNT": "2|2"}),
])
def test_plugins_see_what_that_release_gave_them(
    cls: type, role: Any, count: int, worker: int, expected: dict[str, str], plugin_dir: Path,
    logs: LogRecorder, face_launchers: list[Any], tracker: ProcessTracker,
) -> None:
    write_plugin(plugin_dir, "all_env.sh", ENV_DUMP)
    config = {"runtime_plugin_locations": [str(plugin_dir)], "extra_config": {"k": 1}}
    launcher = cls(config, role, count, worker)
    face_launchers.append(launcher)
    launcher.launch_plugins()
    wait_for(lambda: "ready" in logs.output("all_env.sh"), message="the plugin's lines")
    tracker.add(*[p.pid for p in launcher.plugin_processes])
    assert env_lines(logs, "all_env.sh") == expected
    assert [p.poll() for p in launcher.plugin_processes] == [None]


def test_nothing_lmcache_passes_raises(plugin_dir: Path, logs: LogRecorder,
                                       face_launchers: list[Any], tracker: ProcessTracker) -> None:
    write_plugin(plugin_dir, "all_env.sh", ENV_DUMP)
    write_plugin(plugin_dir, "worker_7_only.sh", "#!/bin/bash\necho seven\nexec sleep 30\n")
    config = {"runtime_plugin_locations": [str(plugin_dir)]}
    odd = [
        (object(), "worker", 4, 0),           # not a config at all
        (config, "kv_both", 4, 0),            # a role no file name can carry
        (config, 3.5, None, "x"),             # nonsense everywhere
        ({"runtime_plugin_locations": 42}, "worker", 4, 0),  # a broken config
    ]
    for args in odd:
        launcher = RuntimePluginLauncher(*args)
        face_launchers.append(launcher)
        launcher.launch_plugins()
        launcher.stop_plugins()
    errors = [m for m in logs.messages if "LMCache drop-in" in m]
    assert len(errors) >= len(odd), errors
    # an ID past the count (pipeline parallelism) is still that worker
    launcher = RuntimePluginLauncher(config, "worker", 4, 7)
    face_launchers.append(launcher)
    launcher.launch_plugins()
    wait_for(lambda: logs.output("worker_7_only.sh") == ["seven"], message="worker 7's plugin")
    tracker.add(*[p.pid for p in launcher.plugin_processes])


def test_stop_fits_lmcaches_ten_second_budget(plugin_dir: Path, tmp_path: Path,
                                              face_launchers: list[Any],
                                              tracker: ProcessTracker) -> None:
    pids = tmp_path / "pids"
    write_plugin(plugin_dir, "all_stubborn.sh", f"""#!/bin/bash
trap '' TERM
sleep 300 &
echo $$ $! > {pids}
while true; do sleep 1; done
""")
    config = {"runtime_plugin_locations": [str(plugin_dir)],
              "plugin_options": {"default": {"stop_timeout": 60}}}
    launcher = RuntimePluginLauncher(config, "worker", 1, 0)
    face_launchers.append(launcher)
    launcher.launch_plugins()
    found = wait_for(lambda: len(read_pids(pids)) == 2 and read_pids(pids))
    tracker.add(*found)
    started = time.monotonic()
    launcher.stop_plugins()  # LMCache gives it 10 s; the plugin's own 60 s would not fit
    assert time.monotonic() - started < lmcache.STOP_BUDGET
    assert not [p for p in found if alive(p)]


def test_keyword_only_identity_in_our_own_api(plugin_dir: Path) -> None:
    config = {"plugin_locations": [str(plugin_dir)]}
    with pytest.raises(TypeError):
        plugin_launcher.PluginLauncher(config, "worker", 0, 1)  # type: ignore[misc]
    launcher = plugin_launcher.PluginLauncher(config, "worker")
    assert (launcher.worker_id, launcher.worker_count) == (DEFAULT_WORKER_ID, DEFAULT_WORKER_COUNT)
    listed = subprocess.run([*CLI, "list", "--plugin-location", str(plugin_dir), "--role",
                             "worker"], capture_output=True, text=True)
    assert f"worker {DEFAULT_WORKER_ID} of {DEFAULT_WORKER_COUNT}" in listed.stdout


@pytest.mark.parametrize("value", ["none", "-1", "None"])
def test_cli_worker_id_none_is_lmcaches_scheduler(value: str, plugin_dir: Path) -> None:
    write_plugin(plugin_dir, "scheduler_0_x.sh", "#!/bin/bash\n")
    write_plugin(plugin_dir, "scheduler_x.sh", "#!/bin/bash\n")
    listed = subprocess.run([*CLI, "list", "--json", "--plugin-location", str(plugin_dir),
                             "--role", "scheduler", "--worker-id", value],
                            capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    chosen = {e["name"]: e["selected"] for e in json.loads(listed.stdout)}
    assert chosen == {"scheduler_0_x.sh": False, "scheduler_x.sh": True}


# --------------------------------------------------------------------- installing the drop-in
@pytest.fixture
def fake_lmcache(tmp_path: Path) -> Iterator[Path]:
    """A package shaped like LMCache 0.5's, on disk, and a clean sys.modules afterwards."""
    root = tmp_path / "site"
    plugin = root / "lmcache" / "v1" / "plugin"
    mp = root / "lmcache" / "v1" / "multiprocess"
    for folder in (plugin, mp):
        folder.mkdir(parents=True)
    for folder in (root / "lmcache", root / "lmcache" / "v1", plugin, mp):
        (folder / "__init__.py").write_text("")
    (plugin / "runtime_plugin_launcher.py").write_text("class RuntimePluginLauncher:\n"
                                                       "    origin = 'lmcache'\n")
    (mp / "mp_runtime_plugin_launcher.py").write_text(
        "from lmcache.v1.plugin.runtime_plugin_launcher import RuntimePluginLauncher\n")
    sys.path.insert(0, str(root))
    yield root
    lmcache.uninstall()
    sys.path.remove(str(root))
    for name in [n for n in sys.modules if n == "lmcache" or n.startswith("lmcache.")]:
        del sys.modules[name]


def test_install_patches_modules_already_imported_and_uninstall_restores(
        fake_lmcache: Path) -> None:
    import lmcache.v1.multiprocess.mp_runtime_plugin_launcher as mp  # type: ignore[import-not-found]
    import lmcache.v1.plugin.runtime_plugin_launcher as defining  # type: ignore[import-not-found]

    original = defining.RuntimePluginLauncher
    lmcache.install()
    lmcache.install()  # idempotent
    assert defining.RuntimePluginLauncher is RuntimePluginLauncher
    assert mp.RuntimePluginLauncher is RuntimePluginLauncher
    lmcache.uninstall()
    assert defining.RuntimePluginLauncher is original
    assert mp.RuntimePluginLauncher is original
    assert not lmcache.installed()


def test_install_before_import_patches_at_load(fake_lmcache: Path) -> None:
    lmcache.install()
    import lmcache.v1.multiprocess.mp_runtime_plugin_launcher as mp

    assert mp.RuntimePluginLauncher is RuntimePluginLauncher
    lmcache.uninstall()
    assert mp.RuntimePluginLauncher.origin == "lmcache"


def test_no_code_route_and_existing_sitecustomize_still_runs(fake_lmcache: Path,
                                                             tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "sitecustomize.py").write_text("import os\nos.environ['THEIRS_RAN'] = '1'\n")
    code = ("import os\nfrom lmcache.v1.multiprocess.mp_runtime_plugin_launcher import "
            "RuntimePluginLauncher as R\nprint(R.__module__, os.environ.get('THEIRS_RAN'))\n"
            "import sys\nprint('plugin_launcher.lmcache' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake_lmcache), str(theirs), SRC])}
    ran = subprocess.run([PYTHON, "-m", "plugin_launcher.lmcache", PYTHON, "-c", code],
                         capture_output=True, text=True, env=env, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["plugin_launcher.lmcache", "1", "True"]
    path = subprocess.run([PYTHON, "-m", "plugin_launcher.lmcache", "--pythonpath"],
                          capture_output=True, text=True, env=env).stdout.strip()
    assert path.split(os.pathsep)[0] == lmcache_hook.BOOTSTRAP_DIR
    # The hook alone, in a process that never imports LMCache, costs only its own import.
    quiet = subprocess.run([PYTHON, "-c", "import sys; print('plugin_launcher.lmcache' in "
                            "sys.modules, 'plugin_launcher.launcher' in sys.modules)"],
                           capture_output=True, text=True,
                           env={**env, "PYTHONPATH": path}, timeout=60)
    assert quiet.stdout.split() == ["False", "False"], quiet.stderr


def test_plugin_lines_visible_when_the_host_configured_no_logging(plugin_dir: Path) -> None:
    write_plugin(plugin_dir, "all_echo.sh", "#!/bin/bash\necho hello from the plugin\n")
    code = f"""
import time
from plugin_launcher.lmcache import RuntimePluginLauncher
launcher = RuntimePluginLauncher({{"runtime_plugin_locations": [{str(plugin_dir)!r}]}},
                                 "worker", 1, 0)
launcher.launch_plugins()
launcher.wait(10)
launcher.stop_plugins()
"""
    ran = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert "[all_echo.sh] hello from the plugin" in ran.stderr


def test_a_config_too_large_for_the_environment_reaches_plugins_in_a_private_file(
    plugin_dir: Path, tmp_path: Path, logs: LogRecorder, launchers: list[Any],
    tracker: ProcessTracker,
) -> None:
    report = tmp_path / "report.json"
    write_plugin(plugin_dir, "all_big.py", f"""
import json, os, stat
from plugin_launcher.plugin import PluginContext
ctx = PluginContext.from_env({{k: v for k, v in os.environ.items()}})
path = os.environ["LMCACHE_PLUGIN_CONFIG_FILE"]
inline = json.loads(os.environ["LMCACHE_PLUGIN_CONFIG"])
json.dump({{"mode": stat.S_IMODE(os.stat(path).st_mode), "kit": len(ctx.extra_config["blob"]),
           "inline_keys": sorted(inline), "omitted": os.environ["LMCACHE_PLUGIN_CONFIG_OMITTED"],
           "runtime": os.environ["LMCACHE_RUNTIME_PLUGIN_CONFIG_FILE"] == path, "path": path}},
          open({str(report)!r}, "w"))
""")
    blob = "x" * 300_000
    config = {"plugin_locations": [str(plugin_dir)], "extra_config": {"blob": blob},
              "small": 1}
    listed = subprocess.run([*CLI, "list", "--json", "--plugin-location", str(plugin_dir),
                             "--role", "worker"], capture_output=True, text=True)
    assert json.loads(listed.stdout)[0]["selected"]
    launcher = plugin_launcher.PluginLauncher(config, "worker")
    launchers.append(launcher)
    launcher.launch_plugins()
    assert launcher.wait(20)
    seen = json.loads(report.read_text())
    assert seen["mode"] == stat.S_IRUSR | stat.S_IWUSR
    assert seen["kit"] == len(blob)
    assert seen["inline_keys"] == ["plugin_locations", "small"]
    assert seen["omitted"] == "extra_config" and seen["runtime"]
    assert launcher.plugins[0].returncode == 0
    launcher.stop_plugins()
    assert not os.path.exists(seen["path"])


def test_role_none_runs_every_file_in_our_api_too(plugin_dir: Path, logs: LogRecorder,
                                                   launchers: list[Any]) -> None:
    for name in ("mp_plugin.sh", "worker_0_x.sh", "all_y.sh"):
        write_plugin(plugin_dir, name, "#!/bin/bash\necho \"role=[$LMCACHE_PLUGIN_ROLE]\"\n")
    launcher = plugin_launcher.PluginLauncher({"plugin_locations": [str(plugin_dir)]}, None)
    launchers.append(launcher)
    launcher.launch_plugins()
    assert launcher.wait(20)
    for name in ("mp_plugin.sh", "worker_0_x.sh", "all_y.sh"):
        assert logs.output(name) == ["role=[]"]

