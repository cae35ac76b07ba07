"""LayerScale (CaiT): a learned per-channel gain on each residual branch, started small (1e-5 in DINOv2
training) so that deep models start close to the identity. The parameter is named `gamma` as in DINOv2/timm."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        # In the branch's dtype: under bf16 autocast a float32 gain would promote the residual stream to
        # float32 (twice the memory traffic in every elementwise kernel); bf16 parameters (FSDP2's mixed
        # precision, the official recipe) keep it bf16 the same way. A no-op in float32.
        return x * self.gamma.to(x.dtype)
