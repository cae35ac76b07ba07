"""iBOT loss: cross-entropy on the masked patch tokens of the global crops, weighted per image."""

from __future__ import annotations

import torch

from pretrain.losses.centering import CenteredTargets


class IBOTPatchLoss(CenteredTargets):
    """iBOT on masked patch tokens; same defaults and centre buffer as DINOLoss. (Sinkhorn-Knopp balances
    over all ranks' masked tokens however many each rank has: see centering.sinkhorn_knopp.)"""

    def forward_masked(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                       masks_weight: torch.Tensor, n_images: int) -> torch.Tensor:
        """Loss over M masked tokens: `student_logits`, `teacher_probs` are (M, K), `masks_weight` (M,).

        Each token weighs 1 / (masked tokens of its image), so every masked image counts once whatever its
        mask ratio (an undocumented DINOv2 detail); the sum is divided by all global-crop images.
        """
        if student_logits.shape[0] == 0:
            return student_logits.sum() * 0.0  # keeps the graph (and FSDP's hooks) alive
        per_token = self.math.soft_cross_entropy(student_logits, teacher_probs, self.student_temp)
        return (per_token * masks_weight).sum() / n_images
