"""Teacher-target centering shared by the DINO and iBOT losses: EMA softmax centering and Sinkhorn-Knopp."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pretrain.distributed import all_reduce_sum, is_dist, world_size


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3,
                   n_samples_total: torch.Tensor | int | None = None) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp (SwAV / DINOv2), rows are samples, columns prototypes.

    Alternately normalises the K x B matrix exp(t / T) so that prototypes get equal mass and every sample
    gets mass 1, with sums all-reduced over ranks (so the whole global batch is balanced). Computed in
    fp32. `n_samples_total` is the global number of rows (default: local rows x world size; iBOT passes
    the all-reduced count of masked patches, which differs per rank). Returns a (B, K) matrix whose rows
    sum to 1.
    """
    t = teacher_logits.float() / teacher_temp
    # Subtracting the global max changes nothing after normalisation but keeps exp() finite in fp32.
    m = t.max().detach().clone()
    if is_dist() and world_size() > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
    q = torch.exp(t - m).t()  # K x B
    k = q.shape[0]
    if n_samples_total is None:
        b = q.shape[1] * world_size()
    else:
        b = float(n_samples_total.item()) if isinstance(n_samples_total, torch.Tensor) else float(n_samples_total)
    q /= all_reduce_sum(q.sum())
    for _ in range(n_iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))  # each prototype gets mass 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample gets mass 1/B (columns are local)
        q /= b
    q *= b
    return q.t()


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
