"""DINO loss on CLS-token prototypes: cross-entropy between teacher targets and student predictions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.losses.centering import CenteredTargets


class DINOLoss(CenteredTargets):
    """Student temperature 0.1, centre EMA momentum 0.9 (DINOv2 defaults). The centre is a (1, K) buffer."""

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
