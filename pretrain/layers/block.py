"""Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(ffn(norm2(x))), with stochastic depth.

Child names (`norm1`, `attn`, `ls1`, `norm2`, `mlp`, `ls2`) match the official DINOv2 and timm layouts.

`forward` takes one tensor (B, N, D) or a list of them (multi-crop: e.g. global crops at 224 and local
crops at 98 in one call). For a list, attention runs per crop group (tokens of different images must not
attend to each other) while the FFN, which is per-token, runs once on all groups' tokens packed together:
fewer, larger matmuls, as in DINOv2's sequence packing but without needing xformers' block-diagonal masks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pretrain.layers.attention import Attention
from pretrain.layers.drop_path import SUBSET_THRESHOLD, DropPath, drop_add_residual_subset
from pretrain.layers.ffn import FFN_LAYERS, Mlp
from pretrain.layers.fused_ops import matmul_accumulate_
from pretrain.layers.layer_scale import LayerScale


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_hidden: int,
        ffn_layer: str = "mlp",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        init_values: float | None = None,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if ffn_layer not in FFN_LAYERS:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; choose one of {sorted(FFN_LAYERS)}")
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = FFN_LAYERS[ffn_layer](dim, ffn_hidden, bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path_rate = drop_path
        # Used only for small rates; larger ones take the subset path (see drop_path.py).
        self.drop_path1 = DropPath(drop_path)
        self.drop_path2 = DropPath(drop_path)
        # (weight, bias) of fc2 with ls2's gain folded in, set by `fold_ffn_residual` for inference.
        self.folded_fc2: tuple[Tensor, Tensor] | None = None

    @torch.no_grad()
    def fold_ffn_residual(self, enabled: bool = True) -> bool:
        """Inference only: compute x + ls2(fc2(h)) as one GEMM that accumulates onto x + gamma*b2, with
        gamma folded into fc2's weight (rows scaled). This removes the separate residual kernel (a full pass
        over the token stream per block, ~4% of a ViT-H/14 forward on an H100). Derived tensors are kept
        beside the parameters (state_dict unchanged), so call it after the last dtype/device move.
        Returns whether the block is folded (only the GELU MLP is)."""
        if not enabled or not isinstance(self.mlp, Mlp):
            self.folded_fc2 = None
            return False
        fc2 = self.mlp.fc2
        w = fc2.weight.float()
        gamma = self.ls2.gamma.float() if isinstance(self.ls2, LayerScale) else w.new_ones(w.shape[0])
        bias = fc2.bias.float() if fc2.bias is not None else w.new_zeros(w.shape[0])
        self.folded_fc2 = ((w * gamma[:, None]).to(fc2.weight.dtype), (bias * gamma).to(fc2.weight.dtype))
        return True

    def _ffn_residual_folded(self, x: Tensor) -> Tensor:
        w, b = self.folded_fc2
        out = x + b  # fresh tensor; the GEMM accumulates into it
        matmul_accumulate_(out, self.mlp.hidden(self.norm2(x)), w)
        return out

    def _attn_branch(self, x: Tensor) -> Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def _ffn_branch(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        if isinstance(x, (list, tuple)):
            return self._forward_list(list(x))
        rate = self.drop_path_rate if self.training else 0.0
        if rate > SUBSET_THRESHOLD:
            x = drop_add_residual_subset(x, self._attn_branch, rate)
            return drop_add_residual_subset(x, self._ffn_branch, rate)
        if rate > 0.0:
            x = x + self.drop_path1(self._attn_branch(x))
            # The official code reuses drop_path1 here (a noted FIXME); two independent draws are intended.
            return x + self.drop_path2(self._ffn_branch(x))
        x = x + self._attn_branch(x)
        if self.folded_fc2 is not None and not self.training:
            return self._ffn_residual_folded(x)
        return x + self._ffn_branch(x)

    def _forward_list(self, xs: list[Tensor]) -> list[Tensor]:
        rate = self.drop_path_rate if self.training else 0.0
        if rate > 0.0:
            # Stochastic depth draws per sample; per group keeps the subset trick's index arithmetic simple.
            return [self.forward(x) for x in xs]
        xs = [x + self._attn_branch(x) for x in xs]
        shapes = [x.shape for x in xs]
        packed = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs], dim=0)
        packed = packed + self._ffn_branch(packed)
        out, start = [], 0
        for s in shapes:
            n = s[0] * s[1]
            out.append(packed[start : start + n].view(s))
            start += n
        return out
