"""Optimizer parameter groups: layer-wise LR decay, patch-embedding multiplier, no decay on norms, biases,
LayerScale, position embedding and tokens, and a flag for the heads' last layer (frozen at the start).

Groups with identical multipliers are fused, so the optimizer has a handful of groups, not one per tensor.
"""

from __future__ import annotations

import re
from collections import defaultdict

from torch import nn

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_LAYER0 = ("pos_embed", "cls_token", "mask_token", "register_tokens", "patch_embed")
_NO_DECAY_TOKENS = ("pos_embed", "cls_token", "mask_token", "register_tokens")


def layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings and tokens, i + 1 for block i, num_layers + 1 for the final norm and the heads."""
    if any(k in name for k in _LAYER0):
        return 0
    m = _BLOCK.search(name)
    if m:
        return int(m.group(1)) + 1
    return num_layers + 1


def no_weight_decay(name: str, param) -> bool:
    # Biases, norms, LayerScale gammas, and the embeddings/tokens (DINOv2 keeps decay on pos_embed; most
    # ViT recipes, and this project, exclude it with the tokens). 1-D tensors are biases/norms/gammas.
    return (name.endswith(".bias") or "norm" in name or "gamma" in name or "ls1" in name or "ls2" in name
            or any(k in name for k in _NO_DECAY_TOKENS) or param.ndim <= 1)


def param_groups(model: nn.Module, *, num_layers: int, layer_decay: float = 0.9,
                 patch_embed_lr_mult: float = 0.2) -> list[dict]:
    """Groups for `model` (the student ModuleDict: backbone + heads). Each group carries `lr_multiplier`,
    `wd_multiplier` and `is_last_layer`; the trainer sets `lr`/`weight_decay` from the schedules each step."""
    buckets: dict[tuple, list] = defaultdict(list)
    names: dict[tuple, list] = defaultdict(list)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        in_backbone = name.startswith("backbone.")
        lid = layer_id(name, num_layers) if in_backbone else num_layers + 1
        lr_mult = layer_decay ** (num_layers + 1 - lid)
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        wd_mult = 0.0 if no_weight_decay(name, p) else 1.0
        is_last = "last_layer" in name
        key = (round(lr_mult, 12), wd_mult, is_last)
        buckets[key].append(p)
        names[key].append(name)
    return [
        {"params": buckets[k], "lr_multiplier": k[0], "wd_multiplier": k[1], "is_last_layer": k[2],
         "names": names[k]}
        for k in sorted(buckets, key=lambda k: (k[2], k[1], k[0]))
    ]


def apply_schedules(optimizer, *, lr: float, last_layer_lr: float, wd: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = (last_layer_lr if g["is_last_layer"] else lr) * g["lr_multiplier"]
        g["weight_decay"] = wd * g["wd_multiplier"]
