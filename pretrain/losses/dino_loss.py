"""DINO loss on CLS-token prototypes: cross-entropy between teacher targets and student predictions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.losses.centering import ema_update_center, sinkhorn_knopp, softmax_centered


class DINOLoss(nn.Module):
    """Student temperature 0.1, centre EMA momentum 0.9 (DINOv2 defaults). The centre is a (1, K) buffer."""

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

    def forward(self, student_logits: list[torch.Tensor], teacher_probs: list[torch.Tensor]) -> torch.Tensor:
        """Sum over every (student crop, teacher crop) pair of the batch-mean cross-entropy.

        The caller chooses the pairs (DINOv2 pairs each student global crop with the *other* teacher
        global crop, and each local crop with both) and divides by the number of terms.
        """
        total = torch.zeros((), device=student_logits[0].device)
        for s in student_logits:
            lsm = F.log_softmax(s.float() / self.student_temp, dim=-1)
            for t in teacher_probs:
                total = total - (t * lsm).sum(dim=-1).mean()
        return total
