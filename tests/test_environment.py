"""What a plugin sees: its environment variables, working directory, stdin and file descriptors.

A real plugin writes a JSON report of what it sees; the tests compare it with what the launcher
was given.  Also: the API's argument checks and LMCache's own config object.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for, write_plugin

from plugin_launcher import PluginLauncher, load_config

REPORTER = """\
import json, os, sys
fds = {}
for fd in os.listdir("/proc/self/fd"):
    try:
        fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        pass  # the descriptor listdir itself used, closed by now
report = {"env": dict(os.environ), "cwd": os.getcwd(), "fds": fds, "stdin": sys.stdin.read()}
path = os.path.join(os.environ["REPORT_DIR"], "report.json")
with open(path + ".tmp", "w") as f:
    json.dump(report, f)
os.rename(path + ".tmp", path)
"""


@pytest.fixture
def report_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "report"
    folder.mkdir()
    monkeypatch.setenv("REPORT_DIR", str(folder))
    return folder


def run_reporter(launcher: PluginLauncher, report_dir: Path,
                 launchers: list[PluginLauncher]) -> dict[str, Any]:
    launchers.append(launcher)
    launcher.launch_plugins()
    path = report_dir / "report.json"
    wait_for(path.exists, 15, message="the plugin's report")
    assert launcher.wait(timeout=10)
    assert [p.returncode for p in launcher.plugins] == [0]
    report: dict[str, Any] = json.loads(path.read_text())
    return report


def test_a_plugin_sees_its_variables_the_parents_environment_cwd_and_no_other_fds(
        plugin_dir: Path, report_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        launchers: list[PluginLauncher]) -> None:
    write_plugin(plugin_dir, "all_env.py", REPORTER)
    config = {
        "plugin_locations": [str(plugin_dir)],
        "extra_config": {"port": 9400, "nested": {"list": [1, 2.5, "three"], "flag": True}},
        "chunk_size": 256,  # keys the launcher does not know are kept
        "remote_url": None,
        "some_section": {"x": [True, False]},
    }
    monkeypatch.setenv("MY_PARENT_VARIABLE", "from the parent")
    monkeypatch.setenv("PYTHONUNBUFFERED", "0")
    cwd = tmp_path / "the working directory"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    leaked = os.open(os.devnull, os.O_RDONLY)  # an inheritable descriptor the plugin must not get
    os.set_inheritable(leaked, True)
    try:
        launcher = PluginLauncher(config, role="Worker", worker_id=3, worker_count=4)
        report = run_reporter(launcher, report_dir, launchers)
    finally:
        os.close(leaked)
    env = report["env"]
    assert env["LMCACHE_PLUGIN_ROLE"] == "WORKER"
    assert json.loads(env["LMCACHE_PLUGIN_CONFIG"]) == config
    assert env["LMCACHE_PLUGIN_WORKER_ID"] == "3"
    assert env["LMCACHE_PLUGIN_WORKER_COUNT"] == "4"
    assert env["LMCACHE_PLUGIN_PARENT_PID"] == str(os.getpid())
    assert env["LMCACHE_PLUGIN_NAME"] == "all_env.py"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["MY_PARENT_VARIABLE"] == "from the parent"
    assert env["PATH"] == os.environ["PATH"]
    assert report["cwd"] == str(cwd)
    assert report["stdin"] == ""
    fds = report["fds"]
    assert sorted(fds) == ["0", "1", "2"], f"inherited descriptors: {fds}"
    assert fds["0"] == "/dev/null"
    assert fds["1"].startswith("pipe:") and fds["2"].startswith("pipe:")


@pytest.mark.parametrize(("worker_id", "expected"), [(None, "-1"), (-1, "-1"), (0, "0"), (7, "7")])
def test_worker_id_as_the_plugin_sees_it(worker_id: int | None, expected: str, plugin_dir: Path,
                                         report_dir: Path,
                                         launchers: list[PluginLauncher]) -> None:
    write_plugin(plugin_dir, "nested/all_env.py", REPORTER)
    launcher = PluginLauncher({"plugin_locations": [str(plugin_dir)]}, role="scheduler",
                              worker_id=worker_id)
    env = run_reporter(launcher, report_dir, launchers)["env"]
    assert env["LMCACHE_PLUGIN_WORKER_ID"] == expected
    assert env["LMCACHE_PLUGIN_WORKER_COUNT"] == "1"
    assert env["LMCACHE_PLUGIN_ROLE"] == "SCHEDULER"
    assert env["LMCACHE_PLUGIN_NAME"] == "nested/all_env.py"
    assert json.loads(env["LMCACHE_PLUGIN_CONFIG"])["extra_config"] == {}


def test_without_a_worker_id_a_name_with_a_worker_id_never_matches(
        plugin_dir: Path, launchers: list[PluginLauncher]) -> None:
    write_plugin(plugin_dir, "all_0_x.sh", "#!/bin/bash\necho zero\n")
    write_plugin(plugin_dir, "scheduler_x.sh", "#!/bin/bash\necho any\n")
    for worker_id in (None, -1):
        launcher = PluginLauncher({"plugin_locations": [str(plugin_dir)]}, role="scheduler",
                                  worker_id=worker_id)
        assert [d.name for d in launcher.plan().selected] == ["scheduler_x.sh"]


def test_a_bash_plugin_sees_the_same_variables(plugin_dir: Path, caplog: pytest.LogCaptureFixture,
                                               launchers: list[PluginLauncher]) -> None:
    caplog.set_level(logging.INFO, logger="plugin_launcher")
    write_plugin(plugin_dir, "worker_1_vars.sh",
                 '#!/bin/bash\necho "$LMCACHE_PLUGIN_ROLE $LMCACHE_PLUGIN_WORKER_ID '
                 '$LMCACHE_PLUGIN_WORKER_COUNT $LMCACHE_PLUGIN_NAME"\n'
                 'echo "$LMCACHE_PLUGIN_CONFIG"\n')
    config = {"plugin_locations": [str(plugin_dir)], "extra_config": {"a": "b c"}}
    launcher = PluginLauncher(config, role="worker", worker_id=1, worker_count=2)
    launchers.append(launcher)
    launcher.launch_plugins()
    assert launcher.wait(timeout=10)
    messages = [r.getMessage() for r in caplog.records if getattr(r, "plugin", None)]
    assert messages[0] == "[worker_1_vars.sh] WORKER 1 2 worker_1_vars.sh"
    assert json.loads(messages[1].split("] ", 1)[1]) == config


def test_a_yaml_file_reaches_the_plugin_whole(plugin_dir: Path, report_dir: Path, tmp_path: Path,
                                              launchers: list[PluginLauncher]) -> None:
    write_plugin(plugin_dir, "all_env.py", REPORTER)
    path = tmp_path / "lmcache.yaml"
    path.write_text(f"chunk_size: 256\nlocal_cpu: true\nplugin_locations: {plugin_dir}\n"
                    "extra_config:\n  port: 9400\n  hosts: [a, b]\n")
    launcher = PluginLauncher(load_config(path), role="worker")
    env = run_reporter(launcher, report_dir, launchers)["env"]
    assert json.loads(env["LMCACHE_PLUGIN_CONFIG"]) == {
        "chunk_size": 256, "local_cpu": True, "plugin_locations": [str(plugin_dir)],
        "extra_config": {"port": 9400, "hosts": ["a", "b"]},
    }


class LMCacheLikeConfig:
    """What LMCache passes: an object with plugin_locations and to_json(), no dict."""

    def __init__(self, locations: list[str]) -> None:
        self.plugin_locations = locations
        self.extra_config = {"token": "abc"}
        self.chunk_size = 256

    def to_json(self) -> str:
        return json.dumps({"chunk_size": self.chunk_size, "local_cpu": False,
                           "plugin_locations": self.plugin_locations,
                           "extra_config": self.extra_config})


def test_an_lmcache_config_object_works(plugin_dir: Path, report_dir: Path,
                                        launchers: list[PluginLauncher]) -> None:
    write_plugin(plugin_dir, "worker_0_env.py", REPORTER)
    write_plugin(plugin_dir, "scheduler_other.py", "raise SystemExit('must not run')\n")
    config = LMCacheLikeConfig([str(plugin_dir)])
    launcher = PluginLauncher(config, role="worker", worker_id=0, worker_count=2)
    env = run_reporter(launcher, report_dir, launchers)["env"]
    assert [p.name for p in launcher.plugins] == ["worker_0_env.py"]
    assert env["LMCACHE_PLUGIN_CONFIG"] == config.to_json()


@pytest.mark.parametrize(("kwargs", "names"), [
    ({"role": "a_b"}, "role"),
    ({"role": ""}, "role"),
    ({"role": "two words"}, "role"),
    ({"worker_id": -5}, "worker_id"),
    ({"worker_id": -2}, "worker_id"),
    ({"worker_id": True}, "worker_id"),
    ({"worker_id": False}, "worker_id"),
    ({"worker_id": "1"}, "worker_id"),
    ({"worker_id": 1.0}, "worker_id"),
    ({"worker_count": 0}, "worker_count"),
    ({"worker_count": -1}, "worker_count"),
    ({"worker_count": True}, "worker_count"),
    ({"worker_count": "2"}, "worker_count"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs: dict[str, Any], names: str,
                                                     plugin_dir: Path) -> None:
    arguments: dict[str, Any] = {"role": "worker", **kwargs}
    with pytest.raises(ValueError, match=names):
        PluginLauncher({"plugin_locations": [str(plugin_dir)]}, **arguments)


def test_role_is_case_insensitive_and_defaults_are_worker_0_of_1(plugin_dir: Path) -> None:
    launcher = PluginLauncher({"plugin_locations": [str(plugin_dir)]}, role="wOrKeR")
    assert (launcher.role, launcher.worker_id, launcher.worker_count) == ("WORKER", 0, 1)
