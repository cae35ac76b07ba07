"""Shared stand-ins for the pretraining tests: a tiny config and a small resumable in-memory image stream."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pretrain.config import TrainConfig


class ListStream:
    """Resumable stream over a list of images: shuffled per epoch, position = samples consumed."""

    def __init__(self, images, seed: int = 0):
        self.images = images
        self.seed = seed
        self.epoch = 0
        self.pos = 0

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.images))
        while self.pos < len(order):
            i = order[self.pos]
            self.pos += 1
            yield self.images[i]
        self.epoch += 1
        self.pos = 0

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos = state["epoch"], state["pos"]


def toy_images(n: int = 24, size: int = 28, seed: int = 0) -> list[Image.Image]:
    """Two kinds of synthetic images (horizontal vs vertical stripes), with noise."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = np.zeros((size, size), np.float32)
        if i % 2:
            a[:, ::4] = 1.0
        else:
            a[::4, :] = 1.0
        a = np.clip(a * 200 + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(a, "L").convert("RGB"))
    return out


def tiny_config(**overrides) -> TrainConfig:
    base = dict(arch="vit_tiny", patch_size=4, img_size=16, embed_dim=32, depth=2, num_heads=2,
                drop_path_rate=0.1, dino_prototypes=64, ibot_prototypes=64, head_hidden_dim=32,
                head_bottleneck_dim=16, global_crops_size=16, local_crops_size=8, local_crops_number=2,
                batch_size_per_rank=4, total_iters=6, warmup_iters=2, warmup_teacher_temp_iters=2,
                freeze_last_layer_iters=1, lr_scaling="none", base_lr=1e-3, checkpoint_every=3, log_every=1,
                num_threads=1)
    base.update(overrides)
    return TrainConfig(**base).validate()
