"""iBOT block masking (BEiT-style) and the batch collate that pairs crops with masks (DINOv2 `masking.py`,
`collate.py`, re-implemented).

Randomness comes from an explicit `numpy.random.Generator`, so a batch's masks are a pure function of the
seed the trainer derives from (run seed, iteration, rank): resumed runs redraw exactly the same masks.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class MaskingGenerator:
    """Masks rectangular blocks on an (H, W) patch grid until about `num_masking_patches` are masked.

    Each block has an area in [min_num_patches, remaining budget] (capped by `max_num_patches`) and an
    aspect ratio log-uniform in [min_aspect, 1/min_aspect]; up to 10 placement attempts per block.
    """

    def __init__(self, input_size: tuple[int, int], max_num_patches: float | None = None,
                 min_num_patches: int = 4, min_aspect: float = 0.3, max_aspect: float | None = None):
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def _add_block(self, mask: np.ndarray, max_mask_patches: float, rng: np.random.Generator) -> int:
        for _ in range(10):
            # Near the end of the budget it can be below the minimum block: draw between the two.
            lo, hi = sorted((self.min_num_patches, max_mask_patches))
            target_area = rng.uniform(lo, hi)
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if 0 < w < self.width and 0 < h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                region = mask[top:top + h, left:left + w]
                new = int((~region).sum())
                if 0 < new <= max_mask_patches:
                    region[:] = True
                    return new
        return 0

    def __call__(self, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            delta = self._add_block(mask, budget, rng)
            if delta == 0:
                break  # no block fits the remaining budget: stop slightly under target, as BEiT does
            count += delta
        return mask


def collate_crops(samples: list[dict], *, n_tokens: int, mask_generator: MaskingGenerator,
                  rng: np.random.Generator, mask_ratio: tuple[float, float] = (0.1, 0.5),
                  mask_probability: float = 0.5) -> dict:
    """Stack crops crop-major (all samples' crop 0, then crop 1, ...) and draw the iBOT masks.

    A fraction `mask_probability` of the global-crop images is masked, with ratios stratified over
    `mask_ratio` (image i of the masked ones gets a ratio uniform in the i-th slice of linspace), the rest
    unmasked; the order is shuffled. Returns `global_crops` (2B, C, H, W), `local_crops` (nB, C, h, w) or
    None, `masks` (2B, N) bool, `mask_indices` (M,) into the flattened masks, `masks_weight` (M,) =
    1 / masked tokens of the token's image, and `n_masked_patches`.
    """
    n_global = len(samples[0]["global_crops"])
    n_local = len(samples[0]["local_crops"])
    global_crops = torch.stack([s["global_crops"][i] for i in range(n_global) for s in samples])
    local_crops = (torch.stack([s["local_crops"][i] for i in range(n_local) for s in samples])
                   if n_local else None)
    b = global_crops.shape[0]
    n_masked_images = int(b * mask_probability)
    bounds = np.linspace(mask_ratio[0], mask_ratio[1], n_masked_images + 1)
    masks = []
    for i in range(n_masked_images):
        ratio = rng.uniform(bounds[i], bounds[i + 1])
        masks.append(torch.from_numpy(mask_generator(int(n_tokens * ratio), rng).reshape(-1)))
    masks += [torch.zeros(n_tokens, dtype=torch.bool) for _ in range(b - n_masked_images)]
    order = rng.permutation(b)
    collated = torch.stack([masks[i] for i in order])
    per_image = collated.sum(dim=-1, keepdim=True).clamp(min=1).float()
    weight = (1.0 / per_image).expand_as(collated)[collated]
    return {
        "global_crops": global_crops,
        "local_crops": local_crops,
        "masks": collated,
        "mask_indices": collated.flatten().nonzero().flatten(),
        "masks_weight": weight,
        "n_masked_patches": int(collated.sum()),
    }
