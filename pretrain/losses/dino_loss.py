"""DINO loss on CLS-token prototypes: cross-entropy between teacher targets and student predictions."""

from __future__ import annotations

import torch

from pretrain.losses.centering import CenteredTargets


class DINOLoss(CenteredTargets):
    """Student temperature 0.1, centre EMA momentum 0.9 (DINOv2 defaults). The centre is a (1, K) buffer."""

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """Sum over the student crops of the batch-mean cross-entropy against the targets.

        `student_logits` is (B, K), or (n_crops, B, K) for several crops of the same B images, and
        `teacher_probs` is (B, K): the rows are matched. The caller chooses the pairs (DINOv2 pairs each
        student global crop with the *other* teacher view, and each local crop with both: the cross-entropy
        is linear in the targets, so that is one term against the sum of the two views' targets) and
        divides by the number of terms.
        """
        ce = self.math.soft_cross_entropy(student_logits, teacher_probs, self.student_temp)
        return ce.mean(dim=-1).sum()
