"""StrictModes for plugin files: what an unsafe plugin looks like to `list` and to `run`.

A plugin folder is code execution with the server's privileges, so (like sshd's StrictModes) a
plugin file, or any folder from its plugin location down to it, that is writable by group or
others, or owned by somebody other than the launcher's user or root, is refused with one line
naming the path and the mode/owner.  ``allow_insecure_plugins`` turns the refusal into a warning;
symlinks are trusted only if their target passes the same check.

Every test goes through the CLI (``python -m plugin_launcher list|run``) and checks what the user
sees: the `list` reason, the `run` log line, which plugins ran and the exit code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import CLI, ProcessTracker, safe_dir, write_plugin

TIMEOUT = 30.0  # per CLI call; only reached if something hangs
LOG_LINE = re.compile(r"^\S+ \S+ plugin-launcher (DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)$")
OTHER_UID = 12345
WHO = {0o666: "group and others", 0o664: "others", 0o662: "others", 0o646: "others",
       0o676: "group and others", 0o620: "group", 0o602: "others"}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown to another uid)")


@dataclass
class Result:
    code: int
    stdout: list[str]
    stderr: str

    def logs(self, level: str | None = None) -> list[str]:
        """The launcher's own messages (stderr), optionally only those of one level."""
        found = []
        for line in self.stderr.splitlines():
            m = LOG_LINE.match(line)
            if m and (level is None or m.group(1) == level):
                found.append(m.group(2))
        return found

    def started(self) -> list[str]:
        return [m.group(1) for line in self.logs("INFO")
                if (m := re.match(r"started plugin (.+) \(pid \d+\)", line))]


def cli(tracker: ProcessTracker, *args: str, prefix: tuple[str, ...] = (),
        cwd: Path | None = None) -> Result:
    proc = tracker.popen([*prefix, *CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(
            f"{args} did not finish in {TIMEOUT}s; stderr:\n{err.decode()}") from None
    return Result(proc.returncode, out.decode("utf-8", "replace").split("\n")[:-1],
                  err.decode("utf-8", "replace"))


def list_json(tracker: ProcessTracker, location: Path, *extra: str) -> dict[str, dict[str, Any]]:
    res = cli(tracker, "list", "--role", "worker", "--plugin-location", str(location), "--json",
              *extra)
    assert res.code in (0, 1), res.stderr  # 1: nothing would run here
    return {d["name"]: d for d in json.loads("\n".join(res.stdout))}


def run(tracker: ProcessTracker, location: Path, *extra: str) -> Result:
    return cli(tracker, "run", "--role", "worker", "--plugin-location", str(location),
               "--stop-timeout", "1", *extra)


def marker_plugin(folder: Path, name: str, marker: Path, mode: int = 0o755) -> Path:
    """A plugin that proves it ran: prints its name and creates ``marker``."""
    return write_plugin(folder, name, f"#!/bin/sh\necho ran {name}\ntouch '{marker}'\n", mode)


def refused_line(res: Result, name: str) -> str:
    """The one error line `run` logs for a refused plugin."""
    lines = [line for line in res.logs("ERROR") if line.startswith(f"plugin {name} refused: ")]
    assert len(lines) == 1, res.stderr
    return lines[0]


# ------------------------------------------------------------------------------------ file mode


@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602], ids=lambda m: f"{m:04o}")
def test_list_refuses_a_file_writable_by_group_or_others(
    tracker: ProcessTracker, plugin_dir: Path, mode: int
) -> None:
    bad = write_plugin(plugin_dir, "all_bad.sh", "echo bad\n", mode)
    write_plugin(plugin_dir, "all_good.sh", "echo good\n")
    reason = f"refused: {bad}: writable by {WHO[mode]} (mode {mode:04o})"

    decisions = list_json(tracker, plugin_dir)
    assert decisions["all_bad.sh"]["selected"] is False
    assert decisions["all_bad.sh"]["reason"] == reason
    assert decisions["all_good.sh"]["selected"] is True

    res = cli(tracker, "list", "--role", "worker", "--plugin-location", str(plugin_dir))
    assert res.code == 0
    lines = [line for line in res.stdout if "all_bad.sh" in line]
    assert len(lines) == 1  # one clear line, naming the file and its mode
    assert re.fullmatch(rf"skip\s+all_bad\.sh\s+{re.escape(reason)}", lines[0]), lines
    assert any(re.match(r"run\s+all_good\.sh\s", line) for line in res.stdout), res.stdout


def test_run_refuses_an_insecure_plugin_and_runs_the_others(
    tracker: ProcessTracker, plugin_dir: Path, tmp_path: Path
) -> None:
    bad = marker_plugin(plugin_dir, "all_bad.sh", tmp_path / "bad-ran", 0o666)
    marker_plugin(plugin_dir, "all_good.sh", tmp_path / "good-ran")

    res = run(tracker, plugin_dir)

    assert res.code == 0, res.stderr  # the plugin that ran succeeded
    assert res.stdout == ["[all_good.sh] ran all_good.sh"]
    assert res.started() == ["all_good.sh"]
    assert refused_line(res, "all_bad.sh") == (
        f"plugin all_bad.sh refused: {bad}: writable by group and others (mode 0666)")
    assert not (tmp_path / "bad-ran").exists()
    assert (tmp_path / "good-ran").exists()


def test_group_writable_file_owned_by_us_is_still_refused(
    tracker: ProcessTracker, plugin_dir: Path, tmp_path: Path
) -> None:
    bad = marker_plugin(plugin_dir, "worker_0_x.sh", tmp_path / "ran", 0o775)
    res = run(tracker, plugin_dir)
    assert refused_line(res, "worker_0_x.sh") == (
        f"plugin worker_0_x.sh refused: {bad}: writable by group (mode 0775)")
    assert res.started() == []
    assert not (tmp_path / "ran").exists()


# ------------------------------------------------------------------------------------- folders


def test_a_folder_between_location_and_file_writable_by_others_is_refused(
    tracker: ProcessTracker, plugin_dir: Path, tmp_path: Path
) -> None:
    sub = plugin_dir / "team" / "shared"
    marker_plugin(sub, "all_deep.sh", tmp_path / "deep-ran")
    marker_plugin(plugin_dir / "team", "all_ok.sh", tmp_path / "ok-ran")
    (plugin_dir / "team").chmod(0o755)
    sub.chmod(0o757)

    decisions = list_json(tracker, plugin_dir)
    assert decisions["team/shared/all_deep.sh"]["reason"] == (
        f"refused: {sub}: writable by others (mode 0757)")
    assert decisions["team/all_ok.sh"]["selected"] is True

    res = run(tracker, plugin_dir)
    assert res.code == 0
    assert res.started() == ["team/all_ok.sh"]
    assert refused_line(res, "team/shared/all_deep.sh") == (
        f"plugin team/shared/all_deep.sh refused: {sub}: writable by others (mode 0757)")
    assert not (tmp_path / "deep-ran").exists()
    assert (tmp_path / "ok-ran").exists()


def test_the_plugin_location_itself_writable_by_group_is_refused(
    tracker: ProcessTracker, tmp_path: Path
) -> None:
    location = safe_dir(tmp_path / "loc")
    marker_plugin(location, "all_x.sh", tmp_path / "ran")
    location.chmod(0o775)
    decisions = list_json(tracker, location)
    assert decisions["all_x.sh"]["reason"] == (
        f"refused: {location}: writable by group (mode 0775)")
    res = run(tracker, location)
    assert res.started() == []
    assert not (tmp_path / "ran").exists()


def test_folders_above_the_location_are_not_checked(
    tracker: ProcessTracker, tmp_path: Path
) -> None:
    """Only the location down to the file counts: /tmp itself is mode 1777 and that is fine."""
    above = tmp_path / "above"
    location = safe_dir(above / "loc")
    above.chmod(0o777)
    marker_plugin(location, "all_x.sh", tmp_path / "ran")
    res = run(tracker, location)
    assert res.code == 0, res.stderr
    assert res.started() == ["all_x.sh"]
    assert (tmp_path / "ran").exists()


# --------------------------------------------------------------------------------------- owners


def test_a_file_owned_by_another_user_is_refused(
    tracker: ProcessTracker, plugin_dir: Path, tmp_path: Path
) -> None:
    theirs = marker_plugin(plugin_dir, "all_theirs.sh", tmp_path / "theirs-ran")
    os.chown(theirs, OTHER_UID, -1)
    marker_plugin(plugin_dir, "all_ours.sh", tmp_path / "ours-ran")

    decisions = list_json(tracker, plugin_dir)
    reason = f"refused: {theirs}: owned by uid {OTHER_UID}, not by uid 0 or root"
    assert decisions["all_theirs.sh"]["reason"] == reason

    res = run(tracker, plugin_dir)
    assert res.code == 0
    assert res.started() == ["all_ours.sh"]
    assert refused_line(res, "all_theirs.sh") == f"plugin all_theirs.sh {reason}"
    assert not (tmp_path / "theirs-ran").exists()


def test_a_folder_owned_by_another_user_is_refused(
    tracker: ProcessTracker, plugin_dir: Path, tmp_path: Path
) -> None:
    sub = safe_dir(plugin_dir / "theirs")
    marker_plugin(sub, "all_x.sh", tmp_path / "ran")
    os.chown(sub, OTHER_UID, -1)
    decisions = list_json(tracker, plugin_dir)
    assert decisions["theirs/all_x.sh"]["reason"] == (
        f"refused: {sub}: owned by uid {OTHER_UID}, not by uid 0 or root")
    res = run(tracker, plugin_dir)
    assert res.started() == []
    assert not (tmp_path / "ran").exists()


def test_owned_by_root_or_by_the_launchers_user_is_fine_for_a_non_root_launcher(
    tracker: ProcessTracker, tmp_path: Path
) -> None:
    """Run the launcher as uid 12345: files of root and of 12345 run, a file of 12346 does not."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs setpriv (util-linux) to run the launcher as another user")
    location = safe_dir(tmp_path / "plugins")
    marks = safe_dir(tmp_path / "marks")
    os.chown(marks, OTHER_UID, OTHER_UID)
    marker_plugin(location, "all_root.sh", marks / "root-ran")  # owned by root (us)
    mine = marker_plugin(location, "all_mine.sh", marks / "mine-ran")
    os.chown(mine, OTHER_UID, OTHER_UID)
    stranger = marker_plugin(location, "all_stranger.sh", marks / "stranger-ran")
    os.chown(stranger, OTHER_UID + 1, OTHER_UID + 1)
    # The interpreter lives under /root (mode 0700): keep only the capability to read and search
    # folders, so the launcher runs as uid 12345 but can still start Python.
    prefix = (setpriv, "--reuid", str(OTHER_UID), "--regid", str(OTHER_UID), "--clear-groups",
              "--inh-caps", "+dac_read_search", "--ambient-caps", "+dac_read_search")
    probe = subprocess.run([*prefix, "id", "-u"], capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != str(OTHER_UID):
        pytest.skip(f"cannot run as uid {OTHER_UID} here: {probe.stderr.strip()}")

    res = cli(tracker, "run", "--role", "worker", "--plugin-location", str(location),
              "--stop-timeout", "1", prefix=prefix, cwd=tmp_path)

    assert res.code == 0, res.stderr
    assert sorted(res.started()) == ["all_mine.sh", "all_root.sh"]
    assert refused_line(res, "all_stranger.sh") == (
        f"plugin all_stranger.sh refused: {stranger}: owned by uid {OTHER_UID + 1}, "
        f"not by uid {OTHER_UID} or root")
    assert (marks / "root-ran").exists() and (marks / "mine-ran").exists()
    assert not (marks / "stranger-ran").exists()


# ------------------------------------------------------------------------------ allow_insecure


def test_allow_insecure_plugins_in_the_config_runs_it_with_a_warning(
    tracker: ProcessTracker, plugin_dir: Path, tmp_path: Path
) -> None:
    bad = marker_plugin(plugin_dir, "all_bad.sh", tmp_path / "ran", 0o666)
    config = tmp_path / "lmcache.yaml"
    config.write_text(f"plugin_locations: ['{plugin_dir}']\nallow_insecure_plugins: true\n")
    warning = f"insecure plugin allowed: {bad}: writable by group and others (mode 0666)"

    res = cli(tracker, "list", "--role", "worker", "--config", str(config), "--json")
    (decision,) = json.loads("\n".join(res.stdout))
    assert decision["selected"] is True
    assert decision["warnings"] == [warning]

    res = cli(tracker, "run", "--role", "worker", "--config", str(config), "--stop-timeout", "1")
    assert res.code == 0, res.stderr
    assert res.stdout == ["[all_bad.sh] ran all_bad.sh"]
    assert res.logs("WARNING") == [warning]
    assert res.logs("ERROR") == []
    assert (tmp_path / "ran").exists()


def test_allow_insecure_flag_runs_it_with_a_warning(
    tracker: ProcessTracker, plugin_dir: Path, tmp_path: Path
) -> None:
    bad = marker_plugin(plugin_dir, "all_bad.sh", tmp_path / "ran", 0o602)
    theirs = marker_plugin(plugin_dir, "all_theirs.sh", tmp_path / "theirs-ran")
    os.chown(theirs, OTHER_UID, -1)

    res = run(tracker, plugin_dir, "--allow-insecure")

    assert res.code == 0, res.stderr
    assert sorted(res.started()) == ["all_bad.sh", "all_theirs.sh"]
    assert sorted(res.logs("WARNING")) == [
        f"insecure plugin allowed: {bad}: writable by others (mode 0602)",
        f"insecure plugin allowed: {theirs}: owned by uid {OTHER_UID}, not by uid 0 or root",
    ]
    assert (tmp_path / "ran").exists() and (tmp_path / "theirs-ran").exists()


def test_allow_insecure_false_in_the_config_still_refuses(
    tracker: ProcessTracker, plugin_dir: Path, tmp_path: Path
) -> None:
    marker_plugin(plugin_dir, "all_bad.sh", tmp_path / "ran", 0o666)
    config = tmp_path / "lmcache.yaml"
    config.write_text(f"plugin_locations: ['{plugin_dir}']\nallow_insecure_plugins: false\n")
    res = cli(tracker, "run", "--role", "worker", "--config", str(config), "--stop-timeout", "1")
    assert res.started() == []
    refused_line(res, "all_bad.sh")
    assert not (tmp_path / "ran").exists()


# ------------------------------------------------------------------------------------ symlinks


def test_a_symlink_to_a_safe_target_runs(
    tracker: ProcessTracker, plugin_dir: Path, tmp_path: Path
) -> None:
    elsewhere = safe_dir(tmp_path / "elsewhere")
    target = marker_plugin(elsewhere, "real.sh", tmp_path / "ran")
    (plugin_dir / "all_link.sh").symlink_to(target)
    res = run(tracker, plugin_dir)
    assert res.code == 0, res.stderr
    assert res.started() == ["all_link.sh"]
    assert res.stdout == ["[all_link.sh] ran real.sh"]
    assert (tmp_path / "ran").exists()


def test_a_symlink_to_an_insecure_target_is_refused(
    tracker: ProcessTracker, plugin_dir: Path, tmp_path: Path
) -> None:
    elsewhere = safe_dir(tmp_path / "elsewhere")
    target = marker_plugin(elsewhere, "real.sh", tmp_path / "ran", 0o666)
    link = plugin_dir / "all_link.sh"
    link.symlink_to(target)

    reason = list_json(tracker, plugin_dir)["all_link.sh"]["reason"]
    assert reason.startswith("refused: ")
    assert "writable by group and others (mode 0666)" in reason
    assert str(link) in reason or str(target) in reason

    res = run(tracker, plugin_dir)
    assert res.started() == []
    assert "mode 0666" in refused_line(res, "all_link.sh")
    assert not (tmp_path / "ran").exists()


def test_a_symlinked_folder_to_an_insecure_folder_is_refused(
    tracker: ProcessTracker, plugin_dir: Path, tmp_path: Path
) -> None:
    shared = safe_dir(tmp_path / "shared")
    marker_plugin(shared, "all_x.sh", tmp_path / "ran")
    shared.chmod(0o777)
    (plugin_dir / "linked").symlink_to(shared)
    reason = list_json(tracker, plugin_dir)["linked/all_x.sh"]["reason"]
    assert reason.startswith("refused: ") and "mode 0777" in reason
    res = run(tracker, plugin_dir)
    assert res.started() == []
    assert not (tmp_path / "ran").exists()


def test_a_symlink_to_a_safe_file_in_a_world_writable_folder_is_refused(
    tracker: ProcessTracker, plugin_dir: Path, tmp_path: Path
) -> None:
    drop = safe_dir(tmp_path / "drop")
    target = marker_plugin(drop, "real.sh", tmp_path / "ran")
    drop.chmod(0o777)  # anybody may replace real.sh (no sticky bit)
    (plugin_dir / "all_link.sh").symlink_to(target)
    reason = list_json(tracker, plugin_dir)["all_link.sh"]["reason"]
    assert reason.startswith("refused: ") and str(drop) in reason and "mode 0777" in reason
    res = run(tracker, plugin_dir)
    assert res.started() == []
    assert not (tmp_path / "ran").exists()
