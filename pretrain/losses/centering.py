"""Teacher-target centering shared by the DINO and iBOT losses: EMA softmax centering and Sinkhorn-Knopp."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from pretrain.distributed import all_reduce_sum, is_dist, world_size


def _logsumexp_all_ranks(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """log(sum(exp(x))) over `dim` (or everything) and over all ranks, stable for any magnitude."""
    m = (x.amax() if dim is None else x.amax(dim=dim, keepdim=True)).detach().clone()
    if is_dist() and world_size() > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
    s = torch.exp(x - m)
    s = s.sum() if dim is None else s.sum(dim=dim, keepdim=True)
    return m + torch.log(all_reduce_sum(s))


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3,
                   n_samples_total: torch.Tensor | int | None = None) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp (SwAV / DINOv2), rows are samples, columns prototypes.

    Alternately normalises the K x B matrix exp(t / T) so that prototypes get equal mass and every sample
    gets mass 1, with sums over samples all-reduced across ranks (the whole global batch is balanced).
    Same iterations as DINOv2, computed in fp32 in the log domain: with T = 0.04 the official exp(t / T)
    overflows or underflows for logits a few units apart, here no sample or prototype can end up as
    0/0. `n_samples_total` is the global number of rows (default: local rows x world size; iBOT passes the
    all-reduced count of masked patches, which differs per rank). Returns a (B, K) matrix whose rows sum
    to 1.
    """
    lq = (teacher_logits.float() / teacher_temp).t()  # K x B, log of the unnormalised matrix
    k = lq.shape[0]
    if n_samples_total is None:
        b = lq.shape[1] * world_size()
    else:
        b = float(n_samples_total.item()) if isinstance(n_samples_total, torch.Tensor) else float(n_samples_total)
    log_k, log_b = math.log(k), math.log(max(b, 1.0))
    lq = lq - _logsumexp_all_ranks(lq)
    for _ in range(n_iterations):
        lq = lq - _logsumexp_all_ranks(lq, dim=1) - log_k  # each prototype: mass 1/K (over all ranks' samples)
        lq = lq - torch.logsumexp(lq, dim=0, keepdim=True) - log_b  # each sample: mass 1/B (columns are local)
    return torch.exp(lq + log_b).t()


@torch.no_grad()
def softmax_centered(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    return torch.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)


@torch.no_grad()
def ema_update_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> None:
    """center <- m * center + (1 - m) * mean of the teacher logits over all rows of all ranks (in place)."""
    rows = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float()
    s = all_reduce_sum(rows.sum(dim=0, keepdim=True))
    n = all_reduce_sum(torch.tensor([float(rows.shape[0])], device=rows.device))
    if n.item() == 0:
        return  # nothing masked anywhere this step: keep the centre
    center.mul_(momentum).add_(s / n, alpha=1 - momentum)


class CenteredTargets(torch.nn.Module):
    """What the DINO and iBOT losses share: the (1, K) centre buffer, owned once, and the teacher targets.

    Subclasses add their cross-entropy; iBOT overrides `sinkhorn_knopp_teacher` to balance over the global
    count of masked tokens.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Targets with the current centre; call `update_center` afterwards with the same logits."""
        return softmax_centered(teacher_logits, self.center, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float,
                               n_iterations: int = 3) -> torch.Tensor:
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        ema_update_center(self.center, teacher_logits, self.center_momentum)
