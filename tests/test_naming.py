"""The file-name rule (``<ROLE>[_<WORKER_ID>][_<DESCRIPTION>].<ext>``) as a table; properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugin_launcher.naming import Target, parse_name

# (file name, role it targets, worker ID it targets or None for every worker)
NAMES = [
    # the documentation's and the examples
    ("scheduler_foo_plugin.py", "SCHEDULER", None),
    ("worker_0_test.sh", "WORKER", 0),
    ("worker_foo.sh", "WORKER", None),
    ("worker_0.sh", "WORKER", None),  # two parts: "0" is a description, not an ID
    ("all_plugin.sh", "ALL", None),
    ("all_1_x.sh", "ALL", 1),
    ("scheduler.py", "SCHEDULER", None),
    ("worker.sh", "WORKER", None),
    # worker IDs
    ("worker_007_x.py", "WORKER", 7),
    ("worker_12_metrics_reporter.py", "WORKER", 12),
    ("worker_0_a_b_c.sh", "WORKER", 0),
    ("worker_x_1.sh", "WORKER", None),  # the ID must be part 2
    ("worker_1a_x.sh", "WORKER", None),  # not all digits
    ("worker_-1_x.sh", "WORKER", None),
    ("worker_+1_x.sh", "WORKER", None),
    ("worker_ 1_x.sh", "WORKER", None),
    ("worker_\u0663_x.sh", "WORKER", None),  # ARABIC-INDIC DIGIT THREE is not an ASCII digit
    ("worker_\u00b2_x.sh", "WORKER", None),  # SUPERSCRIPT TWO
    ("worker_123456789012345678901234567890_x.sh", "WORKER", 123456789012345678901234567890),
    ("worker__x.sh", "WORKER", None),  # empty part 2
    ("worker_1_.sh", "WORKER", 1),  # three parts, the last one empty
    # case-insensitivity
    ("Scheduler_Foo.py", "SCHEDULER", None),
    ("WORKER_0_TEST.SH", "WORKER", 0),
    ("wOrKeR_3_x.Py", "WORKER", 3),
    ("ALL_plugin.sh", "ALL", None),
    ("All_2_x.sh", "ALL", 2),
    # names in sub-folders: only the file name counts
    ("sub/worker_1_x.py", "WORKER", 1),
    ("a/b/c/scheduler_foo.py", "SCHEDULER", None),
    ("worker_9_dir/scheduler_x.py", "SCHEDULER", None),
    ("sub\\all_2_x.sh", "ALL", 2),
    # extensions: only the last one is dropped; no extension at all is fine
    ("worker_1_x.tar.sh", "WORKER", 1),
    ("worker_2_x", "WORKER", 2),
    ("scheduler", "SCHEDULER", None),
    ("custom-role_1_x.py", "CUSTOM-ROLE", 1),
    # odd but legal file names
    ("worker2_1_x.sh", "WORKER2", 1),
    ("my role_0_x.sh", "MY ROLE", 0),
    ("w\u00f6rker_1_x.py", "W\u00d6RKER", 1),
    ("../worker_3_x.sh", "WORKER", 3),
]


@pytest.mark.parametrize(("name", "role", "worker_id"), NAMES)
def test_parse_name(name: str, role: str, worker_id: int | None) -> None:
    assert parse_name(name) == Target(role, worker_id)


# (file name, role of the process, worker ID of the process, expected mismatch reason or None)
SELECTION = [
    ("scheduler_foo_plugin.py", "SCHEDULER", 0, None),
    ("scheduler_foo_plugin.py", "scheduler", None, None),
    ("scheduler_foo_plugin.py", "WORKER", 0, "targets role SCHEDULER"),
    ("scheduler_foo_plugin.py", "worker", 1, "targets role SCHEDULER"),
    ("worker_0_test.sh", "WORKER", 0, None),
    ("worker_0_test.sh", "worker", 0, None),
    ("worker_0_test.sh", "WORKER", 1, "targets worker 0"),
    ("worker_0_test.sh", "SCHEDULER", 0, "targets role WORKER"),
    ("worker_0_test.sh", "WORKER", None, "targets worker 0"),  # no worker ID: never matches an ID
    ("worker_foo.sh", "WORKER", 0, None),
    ("worker_foo.sh", "WORKER", 5, None),
    ("worker_foo.sh", "WORKER", None, None),
    ("worker_0.sh", "WORKER", 3, None),
    ("worker_0.sh", "SCHEDULER", 0, "targets role WORKER"),
    ("all_plugin.sh", "SCHEDULER", 0, None),
    ("all_plugin.sh", "WORKER", 1, None),
    ("all_plugin.sh", "ANYTHING", None, None),
    ("all_1_x.sh", "WORKER", 1, None),
    ("all_1_x.sh", "SCHEDULER", 1, None),
    ("all_1_x.sh", "WORKER", 0, "targets worker 1"),
    ("all_1_x.sh", "SCHEDULER", None, "targets worker 1"),
    ("worker_007_x.py", "WORKER", 7, None),
    ("worker_007_x.py", "WORKER", 0, "targets worker 7"),
    ("Worker_2_x.py", "wOrKeR", 2, None),
    ("sub/worker_1_x.py", "WORKER", 1, None),
    ("sub/worker_1_x.py", "WORKER", 0, "targets worker 1"),
    ("scheduler.py", "SCHEDULER", None, None),
    ("scheduler.py", "WORKER", 0, "targets role SCHEDULER"),
    ("_x.py", "WORKER", 0, "file name has no role"),
]


@pytest.mark.parametrize(("name", "role", "worker_id", "reason"), SELECTION)
def test_mismatch(name: str, role: str, worker_id: int | None, reason: str | None) -> None:
    assert parse_name(name).mismatch(role, worker_id) == reason


def test_role_mismatch_is_reported_before_worker_mismatch() -> None:
    assert Target("SCHEDULER", 3).mismatch("WORKER", 0) == "targets role SCHEDULER"


def test_parse_name_huge_worker_id_does_not_raise() -> None:
    target = parse_name("worker_" + "9" * 5000 + "_x.py")  # unreachable: names are <= 255 bytes
    assert target.role == "WORKER"


@settings(deadline=None)  # no per-example deadline: slowness on a loaded machine is no bug
@given(st.text())
def test_parse_name_never_raises(name: str) -> None:
    target = parse_name(name)
    assert isinstance(target.role, str)
    assert target.role == target.role.upper()
    assert target.worker_id is None or target.worker_id >= 0


name_parts = st.text(alphabet=st.characters(blacklist_characters="_/\\."), max_size=8)


@settings(deadline=None)  # no per-example deadline: slowness on a loaded machine is no bug
@given(name_parts.filter(bool), st.lists(name_parts, max_size=4),
       st.sampled_from([".py", ".sh", ""]))
def test_parse_name_reads_role_and_id_from_parts(first: str, rest: list[str], ext: str) -> None:
    parts = [first, *rest]
    target = parse_name("_".join(parts) + ext)
    assert target.role == parts[0].upper()
    if len(parts) >= 3 and parts[1].isascii() and parts[1].isdigit():
        assert target.worker_id == int(parts[1])
    else:
        assert target.worker_id is None


@settings(deadline=None)  # no per-example deadline: slowness on a loaded machine is no bug
@given(st.text(), st.text(), st.one_of(st.none(), st.integers(min_value=-1, max_value=10**6)))
def test_mismatch_returns_none_or_a_reason(name: str, role: str, worker_id: int | None) -> None:
    result = parse_name(name).mismatch(role, worker_id)
    assert result is None or (isinstance(result, str) and result)


@settings(deadline=None)  # no per-example deadline: slowness on a loaded machine is no bug
@given(st.sampled_from(["scheduler", "worker", "all"]),
       st.integers(min_value=0, max_value=99), st.integers(min_value=0, max_value=99))
def test_worker_specific_name_runs_on_exactly_its_worker(role: str, target: int, mine: int) -> None:
    name = f"{role}_{target}_x.sh"
    process_role = "WORKER" if role == "all" else role.upper()
    result = parse_name(name).mismatch(process_role, mine)
    assert (result is None) == (target == mine)
    if target != mine:
        assert result == f"targets worker {target}"
    assert parse_name(name).mismatch(process_role, None) == f"targets worker {target}"
