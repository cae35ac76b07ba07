"""Small helpers that behave the same with or without an initialised process group."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op in one process); returns `t` for chaining."""
    if is_dist() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
