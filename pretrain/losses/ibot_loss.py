"""iBOT loss: cross-entropy on the masked patch tokens of the global crops, weighted per image."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.distributed import all_reduce_sum
from pretrain.losses.centering import CenteredTargets, sinkhorn_knopp


class IBOTPatchLoss(CenteredTargets):
    """iBOT on masked patch tokens; same defaults and centre buffer as DINOLoss."""

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float,
                               n_iterations: int = 3) -> torch.Tensor:
        # Ranks mask different numbers of patches: the balance is over the global count of masked tokens.
        n_total = all_reduce_sum(torch.tensor(float(teacher_logits.shape[0]), device=teacher_logits.device))
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations, n_samples_total=n_total)

    def forward_masked(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                       masks_weight: torch.Tensor, n_images: int) -> torch.Tensor:
        """Loss over M masked tokens: `student_logits`, `teacher_probs` are (M, K), `masks_weight` (M,).

        Each token weighs 1 / (masked tokens of its image), so every masked image counts once whatever its
        mask ratio (an undocumented DINOv2 detail); the sum is divided by all global-crop images.
        """
        if student_logits.shape[0] == 0:
            return student_logits.sum() * 0.0  # keeps the graph (and FSDP's hooks) alive
        lsm = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        per_token = (teacher_probs * lsm).sum(dim=-1)
        return -(per_token * masks_weight).sum() / n_images
