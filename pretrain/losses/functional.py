"""The losses' math over (rows, K prototypes) matrices, as pure tensor functions: no state, no collectives.

At DINOv2's sizes these matrices dominate the losses' cost: ViT-L/14 has K = 131,072 and ~2,500 masked
patch tokens per GPU, so each float32 matrix is ~1.3 GB. The functions upcast low-precision logits themselves
(no separate `.float()` copy). Eager PyTorch still runs each one as 5-10 kernels that read and write the whole
matrix; `LossMath.compiled()` has torch.compile fuse each into one or two passes, as torchtitan compiles its
loss apart from the model. The loss modules (`centering.CenteredTargets`) hold one `LossMath` and do the
cheap (1, K) bookkeeping and the collectives around it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F


def soft_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """`-sum_k t_k log softmax(s / T)_k` per row, in float32. The targets broadcast against the student rows,
    so DINO's local crops, (n_local, B, K), meet one (B, K) target without copies."""
    lsm = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs * lsm).sum(dim=-1)


def centered_softmax(teacher_logits: torch.Tensor, center: torch.Tensor,
                     teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax((t - center) / T) per row, the (1, K) column sums of t): the targets, and what the centre's
    EMA needs, in one pass over the logits."""
    t = teacher_logits.float()
    return torch.softmax((t - center) / teacher_temp, dim=-1), t.sum(dim=0, keepdim=True)


def _potential_plus_scaled(potential: torch.Tensor, x: torch.Tensor, scale: float) -> torch.Tensor:
    """potential + scale * x as a new float32 matrix, which the callers may update in place. (Not
    torch.add(potential, x, alpha=scale), one pass fewer in eager mode: Dynamo specialises on alpha, so every
    new teacher temperature would recompile.)"""
    return (x.float() * scale).add_(potential)


def column_max_and_sumexp(x: torch.Tensor, scale: float,
                          row_potential: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of `scale * x + a` (`a`: the (rows, 1) row potentials): its max m and
    sum(exp(scale * x + a - m)), both (1, K). Two such pairs from different ranks merge exactly into the
    logsumexp of the union of their rows (centering.py)."""
    y = _potential_plus_scaled(row_potential, x, scale)
    m = y.amax(dim=0, keepdim=True)
    return m, y.sub_(m).exp_().sum(dim=0, keepdim=True)


def row_potential(x: torch.Tensor, scale: float, column_potential: torch.Tensor) -> torch.Tensor:
    """Sinkhorn-Knopp's row step on the potentials: a = -logsumexp over each row of `scale * x + b`, (rows, 1),
    so that every row of exp(scale * x + a + b) sums to 1."""
    return -torch.logsumexp(_potential_plus_scaled(column_potential, x, scale), dim=1, keepdim=True)


def sinkhorn_targets(x: torch.Tensor, scale: float, row_potential: torch.Tensor,
                     column_potential: torch.Tensor) -> torch.Tensor:
    """The balanced assignment exp(scale * x + a + b): one pass that reads the logits and writes the targets."""
    return _potential_plus_scaled(row_potential, x, scale).add_(column_potential).exp_()


@dataclass(frozen=True)
class LossMath:
    """The kernels of the losses, eager or compiled (same signatures, same results to rounding)."""

    soft_cross_entropy: Callable = soft_cross_entropy
    centered_softmax: Callable = centered_softmax
    column_max_and_sumexp: Callable = column_max_and_sumexp
    row_potential: Callable = row_potential
    sinkhorn_targets: Callable = sinkhorn_targets

    @staticmethod
    def compiled() -> "LossMath":
        return _compiled_math()


EAGER = LossMath()


@functools.cache
def _compiled_math() -> LossMath:
    # One compiled set per process, shared by every loss module: the DINO and iBOT losses run the same
    # functions on different row counts, which Dynamo turns into one dynamic-shape graph after the first change
    # (the count of masked patches varies every step).
    return LossMath(**{f.name: torch.compile(getattr(EAGER, f.name)) for f in fields(LossMath)})
