"""Training batches from a resumable sample stream: decode, multi-crop, mask, collate.

The stream is any iterable of images with `state_dict()` / `load_state_dict()` (shards.reader's
ShardDataset in training; tests use small in-memory ones). It is iterated in the training process itself,
not in DataLoader workers, so the stream's position after a batch is exactly the samples consumed; that
is what makes kill-and-resume reproduce the uninterrupted run.

Every batch's randomness (crops, colour, blur, masks) is drawn under a seed derived from (run seed,
iteration, rank), so a resumed run draws the same crops without restoring generator states.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from lvdflow.errors import UserError
from pretrain.masking import MaskingGenerator, collate_crops

_IMAGE_KEYS = ("image", "img", "jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")


def to_pil(sample: Any) -> Image.Image:
    """An RGB PIL image from what a stream yields: PIL image, encoded bytes, uint8 CHW tensor, or a dict /
    tuple holding one (WebDataset samples are dicts keyed by extension)."""
    if isinstance(sample, Image.Image):
        return sample if sample.mode == "RGB" else sample.convert("RGB")
    if isinstance(sample, (bytes, bytearray, memoryview)):
        from curation.decode import decode_rgb

        return decode_rgb(bytes(sample))
    if isinstance(sample, torch.Tensor):
        from torchvision.transforms.v2.functional import to_pil_image

        return to_pil_image(sample).convert("RGB")
    if isinstance(sample, dict):
        for key in _IMAGE_KEYS:
            if key in sample:
                return to_pil(sample[key])
        for key, value in sample.items():  # e.g. "0.jpg" or "image.png" style keys
            if isinstance(key, str) and key.rsplit(".", 1)[-1].lower() in _IMAGE_KEYS:
                return to_pil(value)
        raise UserError(f"sample has no image field (keys: {sorted(sample)[:8]})")
    if isinstance(sample, (tuple, list)) and sample:
        return to_pil(sample[0])
    if isinstance(sample, io.IOBase):
        return to_pil(sample.read())
    raise UserError(f"cannot read an image from a {type(sample).__name__} sample")


class ShardStream:
    """Adapter from shards.reader.ShardDataset to the stream protocol of BatchStream.

    Samples are marked consumed (`record`) as they are drawn, so the position saved with a checkpoint is
    exactly the samples that went into trained batches; at the end of an epoch the next one starts.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __iter__(self):
        for sample in self.dataset:
            self.dataset.record(sample)
            yield sample["image"]
        self.dataset.set_epoch(self.dataset.epoch + 1)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)

    def start_after_epoch(self, epoch: int) -> None:
        """Resume on another process count: positions do not translate, so start the next epoch."""
        self.dataset.set_epoch(int(epoch) + 1)


def batch_seed(seed: int, iteration: int, rank: int) -> int:
    # Distinct, reproducible per (seed, iteration, rank); SeedSequence mixes the three well.
    return int(np.random.SeedSequence([seed, iteration, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


class BatchStream:
    def __init__(self, dataset, *, batch_size: int, seed: int, rank: int, mask_probability: float = 0.5,
                 mask_ratio: tuple[float, float] = (0.1, 0.5)):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.mask_probability = mask_probability
        self.mask_ratio = tuple(mask_ratio)
        self._iter = None

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        self._iter = None

    def start_after_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "start_after_epoch"):
            self.dataset.start_after_epoch(epoch)
        self._iter = None

    def _next_sample(self):
        for attempt in range(2):
            if self._iter is None:
                self._iter = iter(self.dataset)
            try:
                return next(self._iter)
            except StopIteration:
                self._iter = None  # end of an epoch: the stream starts its next one
        raise UserError("the training stream yielded no samples (empty or fully filtered shards?)")

    def next_batch(self, iteration: int, augmentation, patch_size: int) -> dict:
        samples = [self._next_sample() for _ in range(self.batch_size)]
        seed = batch_seed(self.seed, iteration, self.rank)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            crops = [augmentation(to_pil(s)) for s in samples]
        grid = augmentation.global_crops_size // patch_size
        n_tokens = grid * grid
        generator = MaskingGenerator((grid, grid), max_num_patches=0.5 * n_tokens)
        return collate_crops(crops, n_tokens=n_tokens, mask_generator=generator, rng=np.random.default_rng(seed),
                             mask_ratio=self.mask_ratio, mask_probability=self.mask_probability)
