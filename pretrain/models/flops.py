"""Forward FLOPs of a ViT (2 FLOPs per multiply-add), for throughput and utilisation figures.

Counts the matmuls (patch projection, qkv, attention scores and weighted sum, output projection, FFN);
norms, softmax and activations are a few percent and left out, as in timm's published GMAC figures (this
gives 334.8 GFLOPs for ViT-H/14 (16 heads or 20, same count) at 224 against timm's 167.4 GMACs).
"""

from __future__ import annotations

from pretrain.models.vit import ViTConfig


def vit_forward_flops(cfg: ViTConfig, img_size: int) -> float:
    c = cfg.resolved()
    d, hid, p = c.embed_dim, c.ffn_hidden, c.patch_size
    n_patch = (img_size // p) ** 2
    n = n_patch + 1 + c.num_register_tokens
    ffn = (3 if c.ffn_layer == "swiglu" else 2) * d * hid  # MACs per token
    per_block = n * (3 * d * d + d * d + ffn) + 2 * n * n * d  # projections + QK^T and AV
    macs = n_patch * (c.in_chans * p * p) * d + c.depth * per_block
    return 2.0 * macs
