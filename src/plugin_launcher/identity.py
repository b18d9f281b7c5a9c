"""The worker's rank and the cluster's size, read from the launcher that started this process.

Precedence (first found wins): torchrun, Slurm, Open MPI, PMI, Kubernetes indexed Jobs.  torchrun
comes first because it is often run inside a Slurm or MPI allocation, where its own variables are
the ones describing this process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

SOURCES: tuple[tuple[str, str, str | None], ...] = (
    ("torchrun", "RANK", "WORLD_SIZE"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("pmi", "PMI_RANK", "PMI_SIZE"),
    ("kubernetes", "JOB_COMPLETION_INDEX", None),
)


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
