"""ImageNet normalisation of whole uint8 batches on the model's device (training, evaluation, embedding).

Data loaders stop at uint8 (a quarter of the bytes of float32 to send from a worker process and copy to a
GPU) and the batch is normalised in one op where the model runs, instead of two transforms per image.
"""

from __future__ import annotations

import functools

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CROP_KEYS = ("global_crops", "local_crops")  # the image tensors of a collated training batch


class BatchNormalise:
    """uint8 (B, 3, H, W) -> float32 (x / 255 - mean) / std, computed as x * scale + shift.

    Both are held on the device: v2.Normalize turns its Python lists into tensors on every call, a blocking
    host-to-device copy that made the embed loop wait for the GPU to drain once per batch (H100 profile,
    bench/profile_embed_e2e.py)."""

    def __init__(self, device: torch.device | str) -> None:
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale = (1.0 / (255.0 * std)).to(device)
        self.shift = (-mean / std).to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x.to(torch.float32), self.scale)


@functools.lru_cache(maxsize=None)
def _normaliser(device: torch.device) -> BatchNormalise:
    # One per device for the process: building one copies its constants to the device, every step otherwise.
    return BatchNormalise(device)


def normalise_crops(batch: dict) -> dict:
    """The batch with its uint8 crops (as `MultiCropAugmentation` makes them) normalised where they lie;
    float crops are taken as normalised already (the synthetic batches of benchmarks and tests)."""
    out = dict(batch)
    for key in CROP_KEYS:
        crops = out.get(key)
        if isinstance(crops, torch.Tensor) and crops.dtype == torch.uint8:
            out[key] = _normaliser(crops.device)(crops)
    return out


def require_normalised(batch: dict) -> None:
    """A clear error for a model handed raw crops; the convolution's own names neither the cause nor the cure."""
    for key in CROP_KEYS:
        crops = batch.get(key)
        if isinstance(crops, torch.Tensor) and not crops.is_floating_point():
            raise TypeError(f"batch[{key!r}] is {crops.dtype}: normalise the crops first "
                            "(pretrain.loop.to_device or pretrain.normalise.normalise_crops)")
