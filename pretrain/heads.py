"""DINO / iBOT projection heads: a 3-layer MLP, a bottleneck, L2 normalisation and a weight-normalised
prototype layer (DINOv2 `dino_head.py`, re-implemented).

The last layer keeps the weight-norm decomposition as two plain parameters (`weight_g`, `weight_v`,
the names the official checkpoints use) and builds `g * v / ||v||` inside `forward`. A
`torch.nn.utils.parametrizations.weight_norm` module would do the same, but parametrizations and FSDP2's
DTensor parameters do not mix well; plain parameters shard like any other and are all-gathered before the
forward, where the normalisation happens on the full tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Linear layer without bias whose weight is `weight_g * weight_v / ||weight_v||` row-wise."""

    def __init__(self, in_dim: int, out_dim: int, norm_last_layer: bool = False):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        # g starts at 1 and is trained in DINOv2. DINOv1's `norm_last_layer` keeps it frozen at 1 (unit
        # prototypes), which its authors found more stable for small models: a trainable g can shrink
        # towards 0, making student and (EMA) teacher outputs uniform - a collapse the loss cannot undo.
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)
        nn.init.trunc_normal_(self.weight_v, std=0.02)

    def weight(self) -> torch.Tensor:
        return self.weight_g * F.normalize(self.weight_v, dim=1, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())


class DINOHead(nn.Module):
    """`in_dim -> hidden -> hidden -> bottleneck` MLP (GELU, no BN), L2-normalise, then K prototypes."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = False,
    ):
        super().__init__()
        if nlayers < 1:
            raise ValueError("nlayers must be >= 1")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, norm_last_layer)
        self.out_dim = out_dim
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        # eps 1e-6 in low precision (fp16/bf16 underflow), 1e-12 in fp32, as the official head.
        eps = 1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)


def build_heads(embed_dim: int, *, dino_prototypes: int, ibot_prototypes: int, hidden_dim: int,
                bottleneck_dim: int, nlayers: int, ibot_separate_head: bool,
                norm_last_layer: bool = False, ibot_bottleneck_dim: int = 0) -> dict[str, nn.Module]:
    """The heads of one network (student or teacher): `dino_head`, plus `ibot_head` when separate (its
    bottleneck `ibot_bottleneck_dim`, or `bottleneck_dim` when 0).

    With a shared head (DINOv2 default) the masked patch tokens go through `dino_head` too.
    """
    heads: dict[str, nn.Module] = {
        "dino_head": DINOHead(embed_dim, dino_prototypes, hidden_dim, bottleneck_dim, nlayers, norm_last_layer)
    }
    if ibot_separate_head:
        heads["ibot_head"] = DINOHead(embed_dim, ibot_prototypes, hidden_dim, ibot_bottleneck_dim or bottleneck_dim,
                                      nlayers, norm_last_layer)
    return heads
