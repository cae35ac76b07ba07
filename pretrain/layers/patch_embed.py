"""Patch embedding: a stride-p convolution turning (B, 3, H, W) into (B, H/p * W/p, D) tokens.

Named `proj` as in DINOv2/timm checkpoints. Inputs whose sides are not multiples of the patch size are
rejected with a clear message rather than silently cropped by the convolution.
"""

from __future__ import annotations

from torch import Tensor, nn


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {p}")
        return self.proj(x).flatten(2).transpose(1, 2)
