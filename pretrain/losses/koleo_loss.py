"""KoLeo regulariser (Sablayrolles et al.): spread features by the log distance to their nearest neighbour."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    """-mean log(distance to the nearest other sample) of L2-normalised features, in fp32.

    Computed per process on its own batch, as DINOv2 does. It needs at least 2 samples: with one the
    nearest neighbour is undefined (the `koleo_loss: inf` / NaN reports, dinov2 #307, #314).
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.pdist = nn.PairwiseDistance(2, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n < 2:
            raise ValueError(f"KoLeo needs at least 2 samples per process, got {n}: raise the batch size")
        device_type = x.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            x = F.normalize(x.float(), eps=self.eps, p=2, dim=-1)
            with torch.no_grad():
                dots = x @ x.t()
                dots.fill_diagonal_(-2.0)  # below any cosine: a sample is never its own neighbour
                nn_idx = dots.argmax(dim=1)
            d = self.pdist(x, x[nn_idx])
            return -torch.log(d + self.eps).mean()
