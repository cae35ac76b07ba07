"""Stochastic depth: drop a block's residual branch for a random part of the batch during training.

Two forms, as in DINOv2:
- `DropPath` (rate <= 0.1): computes the branch for every sample and zeroes it for dropped ones, scaling the
  kept ones by 1/(1-rate). Cheap to write, but the dropped samples' compute is wasted.
- `drop_add_residual_subset` (rate > 0.1): runs the branch only on a random subset of
  max(int(B*(1-rate)), 1) samples and adds it back (scaled by B/subset) with index_add, so compute really
  shrinks with the rate (at 0.4, a block costs ~60% of its full cost). This is the "efficient stochastic
  depth" of the DINOv2 paper.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

# Above this rate the subset form pays off (DINOv2 uses the same threshold).
SUBSET_THRESHOLD = 0.1


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.rate, self.training)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def drop_add_residual_subset(x: Tensor, branch: Callable[[Tensor], Tensor], rate: float) -> Tensor:
    """x + branch(x) where the branch runs on a random subset of the batch only (see module docstring)."""
    b = x.shape[0]
    subset = max(int(b * (1.0 - rate)), 1)
    idx = torch.randperm(b, device=x.device)[:subset]
    residual = branch(x[idx])
    out = torch.index_add(x.flatten(1), 0, idx, residual.flatten(1).to(x.dtype), alpha=b / subset)
    return out.view_as(x)
