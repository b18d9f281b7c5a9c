"""The worker's rank and the cluster's size, read from the launcher that started this process.

Precedence (first found wins): torchrun, Slurm, Open MPI, PMI, Kubernetes indexed Jobs.  torchrun
comes first because it is often run inside a Slurm or MPI allocation, where its own variables are
the ones describing this process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SOURCES: tuple[tuple[str, str, str | None], ...] = (
    ("torchrun", "RANK", "WORLD_SIZE"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("pmi", "PMI_RANK", "PMI_SIZE"),
    ("kubernetes", "JOB_COMPLETION_INDEX", None),
)


# One default for the CLI and the API, so `list --role worker` and PluginLauncher(...) agree.
DEFAULT_WORKER_ID = 0
DEFAULT_WORKER_COUNT = 1


class IdentityError(ValueError):
    """No (or a malformed) worker identity in the environment."""


@dataclass(frozen=True)
class Identity:
    worker_id: int
    worker_count: int | None  # None: the source has no size (Kubernetes indexed Jobs)
    source: str


def _integer(env: Mapping[str, str], name: str, minimum: int) -> int:
    raw = env[name].strip()
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18 or int(raw) < minimum:
        raise IdentityError(f"{name}={env[name]!r} is not an integer >= {minimum}")
    return int(raw)


def detect_worker_identity(env: Mapping[str, str] | None = None) -> Identity:
    env = os.environ if env is None else env
    for source, rank_var, size_var in SOURCES:
        if rank_var not in env:
            continue
        rank = _integer(env, rank_var, 0)
        size = _integer(env, size_var, 1) if size_var is not None and size_var in env else None
        if size is not None and rank >= size:
            raise IdentityError(f"{rank_var}={rank} is not below {size_var}={size}")
        return Identity(rank, size, source)
    tried = ", ".join(v for _, rank, size in SOURCES for v in (rank, size) if v)
    raise IdentityError(f"no worker identity found in the environment (tried {tried})")


AUTO = "auto"


def resolve_identity(
    worker_id: Any, worker_count: Any, env: Mapping[str, str] | None = None
) -> tuple[Any, Any]:
    """Replace ``"auto"`` by the rank and size of the cluster launcher (the one rule the CLI's
    ``--worker-id auto`` and the API's ``detect=True`` share); other values pass unchanged."""
    if worker_id != AUTO and worker_count != AUTO:
        return worker_id, worker_count
    identity = detect_worker_identity(env)
    if worker_id == AUTO:
        worker_id = identity.worker_id
    if worker_count == AUTO:
        if identity.worker_count is None:
            raise IdentityError(f"{identity.source} gives only the worker ID "
                                "(JOB_COMPLETION_INDEX); pass --worker-count N "
                                "(worker_count=N in Python)")
        worker_count = identity.worker_count
    return worker_id, worker_count
