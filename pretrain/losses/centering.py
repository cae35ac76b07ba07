"""Teacher-target centering shared by the DINO and iBOT losses: EMA softmax centering and Sinkhorn-Knopp.

The heavy passes over the (rows, K) logits are `functional.LossMath` kernels (eager, or compiled by
`CenteredTargets.compile_math`); what is left here is (1, K) bookkeeping and the collectives. Nothing in a
training step reads a value back to the host: a GPU step then never waits for the device to drain.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pretrain.distributed import all_reduce_sum, is_dist, world_size
from pretrain.losses.functional import EAGER, LossMath


def _merge_column_logsumexp(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The logsumexp over all ranks' rows from each rank's (column max m, sum of exp(x - m)): after the max
    is agreed, each rank's sum is rescaled to it and the sums add up (exact, as in online softmax)."""
    if is_dist() and world_size() > 1:
        m_all = m.clone()
        dist.all_reduce(m_all, op=dist.ReduceOp.MAX)
        s = all_reduce_sum(s * torch.exp(m - m_all))
        m = m_all
    return m + torch.log(s)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3,
                   math: LossMath = EAGER) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp (SwAV / DINOv2): rows are samples, columns prototypes.

    Alternately gives every prototype equal mass, over the samples of all ranks (the whole global batch is
    balanced; ranks may hold different numbers of rows, as iBOT's masked patches do), and every sample mass
    1. Same iterations as DINOv2, in float32 in the log domain: with T = 0.04 the official exp(t / T)
    overflows or underflows for logits a few units apart, while here no sample or prototype can end up as
    0/0. Returns a (B, K) matrix whose rows sum to 1.

    The iterations update only potentials, a (B, 1) per row and b (1, K) per column, with the assignment
    always exp(t / T + a + b): each half-iteration is a reduction that reads the logits, and the only
    (B, K) matrix written is the result. (Normalising the matrix itself, as the official code does, writes
    and rereads a float32 (B, K) matrix in every half-iteration: ~3x the memory traffic, ~1.3 GB per pass
    at ViT-L/14's 131,072 prototypes.) The official divisions by K and by the batch size are constant
    shifts of the potentials, which the next normalisation cancels, so they are left out.
    """
    if n_iterations < 1:
        raise ValueError("sinkhorn_knopp needs at least one iteration")
    x, scale = teacher_logits, 1.0 / teacher_temp
    rows, k = x.shape
    a = torch.zeros((rows, 1), device=x.device)
    for _ in range(n_iterations):
        if rows:
            m, s = math.column_max_and_sumexp(x, scale, a)
        else:  # no rows here, but the collectives must still be joined
            m = torch.full((1, k), float("-inf"), device=x.device)
            s = torch.zeros((1, k), device=x.device)
        b = -_merge_column_logsumexp(m, s)
        if rows:
            a = math.row_potential(x, scale, b)
    return math.sinkhorn_targets(x, scale, a, b) if rows else x.float()


@torch.no_grad()
def ema_update_center(center: torch.Tensor, column_sum: torch.Tensor, n_rows: int, momentum: float) -> None:
    """center <- m * center + (1 - m) * the mean teacher logit over all rows of all ranks (in place).

    Takes this rank's column sums and row count. With no rows on any rank the centre is kept, decided on
    the device: no value is read back."""
    s = all_reduce_sum(column_sum.to(center.dtype))
    # torch.full, not torch.tensor: a fill kernel, where a tensor from host data is a blocking copy.
    n = all_reduce_sum(torch.full((1, 1), float(n_rows), device=center.device, dtype=center.dtype))
    updated = center * momentum
    updated.add_(s / n.clamp_min(1.0), alpha=1 - momentum)
    center.copy_(torch.where(n > 0, updated, center))


class CenteredTargets(torch.nn.Module):
    """What the DINO and iBOT losses share: the (1, K) centre buffer, owned once, the teacher targets, and
    the math kernels (`self.math`: eager, or compiled by `compile_math`)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.math = EAGER

    def compile_math(self) -> None:
        self.math = LossMath.compiled()

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float,
                               update_center: bool = False) -> torch.Tensor:
        """Targets with the current centre. With `update_center` the centre then takes its EMA step from
        these logits (from the same pass over them), as `update_center(teacher_logits)` would."""
        probs, column_sum = self.math.centered_softmax(teacher_logits, self.center, teacher_temp)
        if update_center:
            ema_update_center(self.center, column_sum, teacher_logits.shape[0], self.center_momentum)
        return probs

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float,
                               n_iterations: int = 3) -> torch.Tensor:
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations, math=self.math)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        rows = teacher_logits.reshape(-1, teacher_logits.shape[-1])
        ema_update_center(self.center, rows.float().sum(dim=0, keepdim=True), rows.shape[0], self.center_momentum)


def compile_loss_kernels(module: torch.nn.Module) -> None:
    """Compile the math of every loss module found in `module` (a meta-architecture, or several)."""
    for m in module.modules():
        if isinstance(m, CenteredTargets):
            m.compile_math()
