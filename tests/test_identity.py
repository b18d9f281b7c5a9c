"""Worker rank and count from the distributed launcher's environment variables."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugin_launcher import Identity, IdentityError, detect_worker_identity

TRIED = ("RANK, WORLD_SIZE, SLURM_PROCID, SLURM_NTASKS, OMPI_COMM_WORLD_RANK, "
         "OMPI_COMM_WORLD_SIZE, PMI_RANK, PMI_SIZE, JOB_COMPLETION_INDEX")

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
SLURM = {"SLURM_PROCID": "2", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0"}
OPENMPI = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4",
           "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
PMI = {"PMI_RANK": "5", "PMI_SIZE": "6"}
KUBERNETES = {"JOB_COMPLETION_INDEX": "7"}


@pytest.mark.parametrize(("env", "identity"), [
    (TORCHRUN, Identity(3, 4, "torchrun")),
    (SLURM, Identity(2, 8, "slurm")),
    (OPENMPI, Identity(1, 4, "openmpi")),
    (PMI, Identity(5, 6, "pmi")),
    (KUBERNETES, Identity(7, None, "kubernetes")),  # an indexed Job has no count
    ({"RANK": "0", "WORLD_SIZE": "1"}, Identity(0, 1, "torchrun")),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, Identity(0, 1, "slurm")),
    ({"JOB_COMPLETION_INDEX": "0"}, Identity(0, None, "kubernetes")),
    ({"OMPI_COMM_WORLD_RANK": "007", "OMPI_COMM_WORLD_SIZE": "10"}, Identity(7, 10, "openmpi")),
    ({"PMI_RANK": " 2 ", "PMI_SIZE": "4\n"}, Identity(2, 4, "pmi")),
    # a rank without its size: the count is unknown
    ({"RANK": "2"}, Identity(2, None, "torchrun")),
    ({"SLURM_PROCID": "1"}, Identity(1, None, "slurm")),
])
def test_each_source(env: dict[str, str], identity: Identity) -> None:
    assert detect_worker_identity(env) == identity


@pytest.mark.parametrize(("env", "source"), [
    ({**TORCHRUN, **SLURM, **OPENMPI, **PMI, **KUBERNETES}, "torchrun"),
    ({**SLURM, **OPENMPI, **PMI, **KUBERNETES}, "slurm"),
    ({**OPENMPI, **PMI, **KUBERNETES}, "openmpi"),
    ({**PMI, **KUBERNETES}, "pmi"),
    ({**TORCHRUN, **KUBERNETES}, "torchrun"),
    ({**SLURM, **PMI}, "slurm"),
    ({**OPENMPI, **KUBERNETES}, "openmpi"),
])
def test_precedence(env: dict[str, str], source: str) -> None:
    expected = {"torchrun": Identity(3, 4, "torchrun"), "slurm": Identity(2, 8, "slurm"),
                "openmpi": Identity(1, 4, "openmpi"), "pmi": Identity(5, 6, "pmi")}[source]
    assert detect_worker_identity(env) == expected


def test_torchrun_inside_slurm_wins() -> None:
    # torchrun started by srun: one Slurm task, several torchrun ranks
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "RANK": "3", "WORLD_SIZE": "4"}
    assert detect_worker_identity(env) == Identity(3, 4, "torchrun")


def test_size_of_another_source_is_not_mixed_in() -> None:
    assert detect_worker_identity({"RANK": "1", "SLURM_NTASKS": "8"}) == Identity(1, None,
                                                                                 "torchrun")


@pytest.mark.parametrize("env", [{}, {"LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
                                 {"WORLD_SIZE": "4", "SLURM_NTASKS": "2", "PMI_SIZE": "2"}])
def test_nothing_found_names_the_variables_tried(env: dict[str, str]) -> None:
    with pytest.raises(IdentityError) as info:
        detect_worker_identity(env)
    assert str(info.value) == f"no worker identity found in the environment (tried {TRIED})"


@pytest.mark.parametrize(("env", "message"), [
    ({"RANK": "x"}, "RANK='x' is not an integer >= 0"),
    ({"RANK": ""}, "RANK='' is not an integer >= 0"),
    ({"RANK": "-1", "WORLD_SIZE": "4"}, "RANK='-1' is not an integer >= 0"),
    ({"RANK": "+1"}, "RANK='+1' is not an integer >= 0"),
    ({"RANK": "1.0"}, "RANK='1.0' is not an integer >= 0"),
    ({"RANK": "0x1"}, "RANK='0x1' is not an integer >= 0"),
    ({"RANK": "1", "WORLD_SIZE": "0"}, "WORLD_SIZE='0' is not an integer >= 1"),
    ({"RANK": "1", "WORLD_SIZE": "four"}, "WORLD_SIZE='four' is not an integer >= 1"),
    ({"RANK": "1", "WORLD_SIZE": ""}, "WORLD_SIZE='' is not an integer >= 1"),
    ({"RANK": "4", "WORLD_SIZE": "4"}, "RANK=4 is not below WORLD_SIZE=4"),
    ({"SLURM_PROCID": "9", "SLURM_NTASKS": "2"}, "SLURM_PROCID=9 is not below SLURM_NTASKS=2"),
    ({"OMPI_COMM_WORLD_RANK": "a", "OMPI_COMM_WORLD_SIZE": "4"},
     "OMPI_COMM_WORLD_RANK='a' is not an integer >= 0"),
    ({"PMI_RANK": "1", "PMI_SIZE": "-2"}, "PMI_SIZE='-2' is not an integer >= 1"),
    ({"JOB_COMPLETION_INDEX": "idx"}, "JOB_COMPLETION_INDEX='idx' is not an integer >= 0"),
    # a malformed higher-precedence source is an error, not skipped
    ({"RANK": "bad", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
     "RANK='bad' is not an integer >= 0"),
])
def test_malformed_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(IdentityError) as info:
        detect_worker_identity(env)
    assert str(info.value) == message


@pytest.mark.parametrize("value", ["\u00b2", "1\u00b2", "9" * 5000])
def test_odd_digits_are_an_identity_error(value: str) -> None:
    with pytest.raises(IdentityError) as info:
        detect_worker_identity({"RANK": value})
    assert str(info.value).startswith("RANK=")


def test_default_env_is_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TRIED.split(", "):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setenv("PMI_SIZE", "2")
    assert detect_worker_identity() == Identity(1, 2, "pmi")


@settings(deadline=None)  # no per-example deadline: slowness on a loaded machine is no bug
@given(st.integers(0, 10**6), st.integers(1, 10**6),
       st.sampled_from([("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"),
                        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                        ("PMI_RANK", "PMI_SIZE")]))
def test_rank_below_size_is_read_back(rank: int, size: int, names: tuple[str, str]) -> None:
    env = {names[0]: str(rank), names[1]: str(size)}
    if rank < size:
        identity = detect_worker_identity(env)
        assert (identity.worker_id, identity.worker_count) == (rank, size)
    else:
        with pytest.raises(IdentityError) as info:
            detect_worker_identity(env)
        assert str(info.value) == f"{names[0]}={rank} is not below {names[1]}={size}"


ascii_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=6)


@settings(deadline=None)  # no per-example deadline: slowness on a loaded machine is no bug
@given(st.dictionaries(st.sampled_from(TRIED.split(", ") + ["OTHER"]), ascii_text, max_size=5))
def test_only_identity_error_is_raised(env: dict[str, str]) -> None:
    try:
        identity = detect_worker_identity(env)
    except IdentityError as exc:
        assert str(exc)
    else:
        assert identity.worker_id >= 0
        assert identity.worker_count is None or identity.worker_id < identity.worker_count
