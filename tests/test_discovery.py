"""Finding plugin files (recursion, skipping, symlinks, duplicates) and the permission check."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from helpers import safe_dir, write_plugin

from plugin_launcher.discovery import PluginFile, discover, insecure_reason

OTHER_UID = 12345


def names(files: list[PluginFile]) -> list[str]:
    return [f.name for f in files]


def test_recursive_search_skips_hidden_pycache_and_other_files(plugin_dir: Path) -> None:
    for name in ["scheduler_a.py", "all_b.sh", "sub/worker_0_c.py", "sub/deeper/all_d.sh",
                 "UPPER.PY", "shell.SH", "folder.py/worker_h.sh",
                 # never plugins:
                 "readme.txt", "x.pyc", "script.py.bak", "noext", ".hidden.py", ".hid/all_e.py",
                 "__pycache__/all_f.py", "sub/__pycache__/all_g.py", "sub/.git/hook.sh"]:
        write_plugin(plugin_dir, name, "echo\n")
    files, warnings = discover([str(plugin_dir)])
    assert warnings == []
    assert names(files) == ["UPPER.PY", "all_b.sh", "folder.py/worker_h.sh", "scheduler_a.py",
                            "shell.SH", "sub/deeper/all_d.sh", "sub/worker_0_c.py"]
    for f in files:
        assert f.path == os.path.join(str(plugin_dir), f.name)
        assert f.location == str(plugin_dir)


def test_names_with_spaces_and_unicode_are_found(plugin_dir: Path) -> None:
    created = ["all x.sh", "all_\u00fcn\u00ef.py", "w\u00f6rker_1_\u65e5\u672c.sh",
               "sub dir/all_y.py"]
    for name in created:
        write_plugin(plugin_dir, name, "echo\n")
    files, _ = discover([str(plugin_dir)])
    assert sorted(names(files)) == sorted(created)


def test_order_is_sorted_by_path(plugin_dir: Path) -> None:
    created = ["z.sh", "a/z.py", "m.py", "a.py", "b/a.sh", "a_b.py", "a-b.py"]
    for name in created:
        write_plugin(plugin_dir, name, "echo\n")
    files, _ = discover([str(plugin_dir)])
    paths = [f.path for f in files]
    assert paths == sorted(paths)
    assert sorted(names(files)) == sorted(created)


def test_order_across_locations_is_sorted_by_path(tmp_path: Path) -> None:
    first = safe_dir(tmp_path / "b_loc")
    second = safe_dir(tmp_path / "a_loc")
    write_plugin(first, "all_1.sh", "echo\n")
    write_plugin(second, "all_2.sh", "echo\n")
    files, _ = discover([str(first), str(second)])
    assert [f.path for f in files] == [str(second / "all_2.sh"), str(first / "all_1.sh")]


def test_empty_folder(plugin_dir: Path) -> None:
    assert discover([str(plugin_dir)]) == ([], [])


def test_no_locations() -> None:
    assert discover([]) == ([], [])


def test_symlink_loops_terminate_and_each_file_runs_once(plugin_dir: Path) -> None:
    write_plugin(plugin_dir, "all_top.sh", "echo\n")
    write_plugin(plugin_dir, "sub/all_inner.sh", "echo\n")
    os.symlink("..", plugin_dir / "sub" / "up")
    os.symlink(".", plugin_dir / "self")
    os.symlink(str(plugin_dir), plugin_dir / "sub" / "abs")
    files, warnings = discover([str(plugin_dir)])
    assert warnings == []
    assert len(files) == 2
    assert sorted(os.path.realpath(f.path) for f in files) == [
        os.path.realpath(plugin_dir / "all_top.sh"),
        os.path.realpath(plugin_dir / "sub" / "all_inner.sh"),
    ]


def test_mutual_symlink_loop_between_locations(tmp_path: Path) -> None:
    a = safe_dir(tmp_path / "a")
    b = safe_dir(tmp_path / "b")
    write_plugin(a, "all_a.sh", "echo\n")
    write_plugin(b, "all_b.sh", "echo\n")
    os.symlink(str(b), a / "to_b")
    os.symlink(str(a), b / "to_a")
    files, _ = discover([str(a), str(b)])
    assert sorted(os.path.basename(f.path) for f in files) == ["all_a.sh", "all_b.sh"]


def test_file_symlink_runs_once_under_the_first_path(plugin_dir: Path) -> None:
    write_plugin(plugin_dir, "worker_a.py", "print()\n")
    os.symlink("worker_a.py", plugin_dir / "worker_b.py")
    files, _ = discover([str(plugin_dir)])
    assert names(files) == ["worker_a.py"]


def test_file_symlink_sorting_first_is_kept(plugin_dir: Path) -> None:
    write_plugin(plugin_dir, "z_real.sh", "echo\n")
    os.symlink("z_real.sh", plugin_dir / "a_link.sh")
    files, _ = discover([str(plugin_dir)])
    assert names(files) == ["a_link.sh"]


@pytest.mark.parametrize(("link", "real"), [("a_link", "b_real"), ("b_link", "a_real"),
                                            ("link", "real"), ("real", "link")])
def test_folder_reached_twice_runs_its_files_once(plugin_dir: Path, link: str, real: str) -> None:
    write_plugin(plugin_dir, f"{real}/all_x.sh", "echo\n")
    os.symlink(real, plugin_dir / link)
    files, _ = discover([str(plugin_dir)])
    assert len(files) == 1
    assert files[0].name in (f"{link}/all_x.sh", f"{real}/all_x.sh")


def test_folder_reached_twice_gets_the_first_name_by_path(tmp_path: Path) -> None:
    # The same layout under many name pairs: the kept name must always be the first by path.
    kept = []
    for i in range(12):
        location = safe_dir(tmp_path / f"loc{i}")
        link, real = f"d{i}_a", f"d{i}_b"
        if i % 2:
            link, real = real, link
        write_plugin(location, f"{real}/all_x.sh", "echo\n")
        os.symlink(real, location / link)
        files, _ = discover([str(location)])
        kept.append((names(files), [f"d{i}_a/all_x.sh"]))
    assert [k[0] for k in kept] == [k[1] for k in kept]


def test_duplicate_location_runs_once(plugin_dir: Path) -> None:
    write_plugin(plugin_dir, "all_x.sh", "echo\n")
    for locations in ([str(plugin_dir)] * 2, [str(plugin_dir), str(plugin_dir) + "/"],
                      [str(plugin_dir), str(plugin_dir / "." / "")]):
        files, warnings = discover(locations)
        assert names(files) == ["all_x.sh"], locations
        assert warnings == []


def test_file_location_inside_folder_location_runs_once(plugin_dir: Path) -> None:
    path = write_plugin(plugin_dir, "all_x.sh", "echo\n")
    for locations in ([str(plugin_dir), str(path)], [str(path), str(plugin_dir)]):
        files, _ = discover(locations)
        assert names(files) == ["all_x.sh"], locations
        assert files[0].path == str(path)


def test_nested_locations_run_each_file_once_named_from_the_first(plugin_dir: Path) -> None:
    write_plugin(plugin_dir, "sub/all_x.sh", "echo\n")
    files, _ = discover([str(plugin_dir), str(plugin_dir / "sub")])
    assert names(files) == ["sub/all_x.sh"]
    files, _ = discover([str(plugin_dir / "sub"), str(plugin_dir)])
    assert names(files) == ["all_x.sh"]


def test_file_location_is_named_by_its_file_name(tmp_path: Path) -> None:
    path = write_plugin(safe_dir(tmp_path / "deep" / "er"), "worker_0_x.sh", "echo\n")
    files, warnings = discover([str(path)])
    assert warnings == []
    assert files == [PluginFile("worker_0_x.sh", str(path), str(path))]


def test_file_location_with_any_extension_is_kept(tmp_path: Path) -> None:
    path = write_plugin(safe_dir(tmp_path / "d"), "all_tool", "#!/bin/sh\n")
    files, _ = discover([str(path)])
    assert names(files) == ["all_tool"]


def test_relative_location_names_are_relative_to_it(plugin_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    write_plugin(plugin_dir, "sub/worker_1_x.py", "print()\n")
    monkeypatch.chdir(plugin_dir.parent)
    files, _ = discover([plugin_dir.name])
    assert files == [PluginFile("sub/worker_1_x.py", f"{plugin_dir.name}/sub/worker_1_x.py",
                                plugin_dir.name)]


def test_missing_location_warns_and_others_still_found(plugin_dir: Path, tmp_path: Path) -> None:
    write_plugin(plugin_dir, "all_x.sh", "echo\n")
    missing = str(tmp_path / "nowhere")
    files, warnings = discover([missing, str(plugin_dir)])
    assert names(files) == ["all_x.sh"]
    assert warnings == [f"{missing}: plugin location not usable: No such file or directory"]


def test_broken_symlink_location_warns(tmp_path: Path) -> None:
    link = tmp_path / "dangling"
    os.symlink(str(tmp_path / "gone"), link)
    files, warnings = discover([str(link)])
    assert files == []
    assert warnings == [f"{link}: plugin location not usable: No such file or directory"]


def _stack_depth() -> int:
    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    return depth


def test_very_deep_tree_does_not_hit_the_recursion_limit(plugin_dir: Path) -> None:
    levels = 300
    folder = str(plugin_dir)
    limit = sys.getrecursionlimit()
    try:
        for _ in range(levels):
            folder = os.path.join(folder, "d")
            os.mkdir(folder)
        with open(os.path.join(folder, "all_x.sh"), "w") as f:
            f.write("echo\n")
        # a recursive walk would need a frame per level: leave far fewer than that
        sys.setrecursionlimit(_stack_depth() + 100)
        try:
            files, _ = discover([str(plugin_dir)])
        finally:
            sys.setrecursionlimit(limit)
        assert names(files) == ["/".join(["d"] * levels) + "/all_x.sh"]
    finally:
        # remove it bottom-up here, not with a recursive shutil.rmtree
        if os.path.exists(os.path.join(folder, "all_x.sh")):
            os.unlink(os.path.join(folder, "all_x.sh"))
        while folder != str(plugin_dir):
            os.rmdir(folder)
            folder = os.path.dirname(folder)


# ---------------------------------------------------------------------------------------------
# insecure_reason


def found(location: Path) -> dict[str, PluginFile]:
    files, _ = discover([str(location)])
    return {f.name: f for f in files}


def test_safe_plugin(plugin_dir: Path) -> None:
    write_plugin(plugin_dir, "sub/all_x.sh", "echo\n")
    safe_dir(plugin_dir / "sub")
    assert insecure_reason(found(plugin_dir)["sub/all_x.sh"]) is None


@pytest.mark.parametrize(("mode", "who"), [
    (0o775, "group"), (0o664, "group"), (0o757, "others"), (0o646, "others"),
    (0o777, "group and others"), (0o666, "group and others"),
])
def test_writable_file(plugin_dir: Path, mode: int, who: str) -> None:
    path = write_plugin(plugin_dir, "all_x.sh", "echo\n", mode=mode)
    assert insecure_reason(found(plugin_dir)["all_x.sh"]) == (
        f"{path}: writable by {who} (mode {mode:04o})")


@pytest.mark.parametrize("mode", [0o755, 0o700, 0o500, 0o444, 0o4755])
def test_not_writable_file_is_fine(plugin_dir: Path, mode: int) -> None:
    write_plugin(plugin_dir, "all_x.sh", "echo\n", mode=mode)
    assert insecure_reason(found(plugin_dir)["all_x.sh"]) is None


@pytest.mark.parametrize(("mode", "who"), [(0o775, "group"), (0o777, "group and others"),
                                           (0o1777, "group and others"), (0o757, "others")])
def test_writable_folder_between_location_and_file(plugin_dir: Path, mode: int, who: str) -> None:
    write_plugin(plugin_dir, "a/b/all_x.sh", "echo\n")
    safe_dir(plugin_dir / "a")
    safe_dir(plugin_dir / "a" / "b")
    (plugin_dir / "a").chmod(mode)
    assert insecure_reason(found(plugin_dir)["a/b/all_x.sh"]) == (
        f"{plugin_dir / 'a'}: writable by {who} (mode {mode:04o})")


def test_writable_location_itself(plugin_dir: Path) -> None:
    write_plugin(plugin_dir, "all_x.sh", "echo\n")
    plugin_dir.chmod(0o770)
    assert insecure_reason(found(plugin_dir)["all_x.sh"]) == (
        f"{plugin_dir}: writable by group (mode 0770)")


def test_folders_above_the_location_are_not_checked(tmp_path: Path) -> None:
    above = tmp_path / "shared"
    above.mkdir()
    above.chmod(0o1777)
    location = safe_dir(above / "plugins")
    write_plugin(location, "all_x.sh", "echo\n")
    assert insecure_reason(found(location)["all_x.sh"]) is None


def test_file_location_checks_the_file_only(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o777)
    path = write_plugin(folder, "all_x.sh", "echo\n")
    files, _ = discover([str(path)])
    assert insecure_reason(files[0]) is None
    path.chmod(0o777)
    assert insecure_reason(files[0]) == f"{path}: writable by group and others (mode 0777)"


def test_symlink_to_writable_target(plugin_dir: Path, tmp_path: Path) -> None:
    outside = safe_dir(tmp_path / "outside")
    target = write_plugin(outside, "target.sh", "echo\n", mode=0o666)
    link = plugin_dir / "all_x.sh"
    os.symlink(str(target), link)
    assert insecure_reason(found(plugin_dir)["all_x.sh"]) == (
        f"{link}: writable by group and others (mode 0666)")


def test_symlink_to_safe_target(plugin_dir: Path, tmp_path: Path) -> None:
    outside = safe_dir(tmp_path / "outside")
    target = write_plugin(outside, "target.sh", "echo\n")
    os.symlink(str(target), plugin_dir / "all_x.sh")
    assert insecure_reason(found(plugin_dir)["all_x.sh"]) is None


def test_symlinked_folder_to_writable_target(plugin_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write_plugin(outside, "all_x.sh", "echo\n")
    outside.chmod(0o777)
    os.symlink(str(outside), plugin_dir / "linked")
    assert insecure_reason(found(plugin_dir)["linked/all_x.sh"]) == (
        f"{plugin_dir / 'linked'}: writable by group and others (mode 0777)")


def test_file_owned_by_another_user(plugin_dir: Path) -> None:
    path = write_plugin(plugin_dir, "all_x.sh", "echo\n")
    os.chown(path, OTHER_UID, -1)
    uid = os.geteuid()
    assert insecure_reason(found(plugin_dir)["all_x.sh"]) == (
        f"{path}: owned by uid {OTHER_UID}, not by uid {uid} or root")


def test_folder_owned_by_another_user(plugin_dir: Path) -> None:
    write_plugin(plugin_dir, "sub/all_x.sh", "echo\n")
    os.chown(plugin_dir / "sub", OTHER_UID, OTHER_UID)
    uid = os.geteuid()
    assert insecure_reason(found(plugin_dir)["sub/all_x.sh"]) == (
        f"{plugin_dir / 'sub'}: owned by uid {OTHER_UID}, not by uid {uid} or root")


def test_other_group_alone_is_fine(plugin_dir: Path) -> None:
    path = write_plugin(plugin_dir, "all_x.sh", "echo\n")
    os.chown(path, -1, OTHER_UID)
    assert insecure_reason(found(plugin_dir)["all_x.sh"]) is None


def test_symlink_owned_by_us_to_file_owned_by_another_user(plugin_dir: Path,
                                                           tmp_path: Path) -> None:
    target = write_plugin(safe_dir(tmp_path / "outside"), "t.sh", "echo\n")
    os.chown(target, OTHER_UID, -1)
    link = plugin_dir / "all_x.sh"
    os.symlink(str(target), link)
    assert insecure_reason(found(plugin_dir)["all_x.sh"]) == (
        f"{link}: owned by uid {OTHER_UID}, not by uid {os.geteuid()} or root")


def test_the_file_is_checked_before_its_folders(plugin_dir: Path) -> None:
    path = write_plugin(plugin_dir, "sub/all_x.sh", "echo\n", mode=0o777)
    (plugin_dir / "sub").chmod(0o777)
    assert insecure_reason(found(plugin_dir)["sub/all_x.sh"]) == (
        f"{path}: writable by group and others (mode 0777)")


def test_file_deleted_after_discovery(plugin_dir: Path) -> None:
    path = write_plugin(plugin_dir, "all_x.sh", "echo\n")
    plugin = found(plugin_dir)["all_x.sh"]
    path.unlink()
    assert insecure_reason(plugin) == (
        f"{path}: cannot check permissions: No such file or directory")
