"""Multi-head self-attention with one fused kernel per call.

On CUDA, xformers' `memory_efficient_attention` is used when it is installed (the official DINOv2 kernel),
outside torch.compile'd regions; everywhere else `torch.nn.functional.scaled_dot_product_attention`, which
dispatches to FlashAttention / memory-efficient / math kernels by itself. Both compute
softmax(q k^T / sqrt(d)) v with the same weights, so a checkpoint gives the same outputs either way (up to
kernel rounding).

Parameter names (`qkv`, `proj`) follow the official DINOv2 and timm layouts, so checkpoints map 1:1.
Set LVDFLOW_DISABLE_XFORMERS=1 to force the PyTorch kernel (useful to compare the two).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # optional GPU extra
    from xformers.ops import memory_efficient_attention as _xformers_attention
except Exception:  # not installed, or built for another torch: fall back to SDPA
    _xformers_attention = None


def xformers_available() -> bool:
    return _xformers_attention is not None and os.environ.get("LVDFLOW_DISABLE_XFORMERS", "") in ("", "0")


def use_xformers(q: Tensor) -> bool:
    """xformers for CUDA tensors when installed, except while torch.compile traces: its kernel is opaque to
    Dynamo (a graph break in every block, facebookresearch/xformers#765), so inside a compiled region SDPA,
    which Inductor traces, computes the same function."""
    return q.is_cuda and xformers_available() and not torch.compiler.is_compiling()


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Scaled dot-product attention on (B, N, H, Dh) tensors; returns (B, N, H, Dh).

    The (B, N, H, Dh) layout is xformers' native one; SDPA wants heads before tokens, so it gets transposed
    views (no copy: SDPA handles the strides).
    """
    if use_xformers(q):
        return _xformers_attention(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class Attention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        # One matmul for q, k and v; unbind gives strided views, not copies.
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)
        out = attention(q, k, v)
        return self.proj(out.reshape(b, n, c))
