"""Reading manifest images for embedding: the fixed eval transform and a Dataset that never raises.

The transform is DINOv2's evaluation one: resize the short side to crop*256/224 (bicubic, antialiased),
centre crop, ImageNet normalisation. Images whose short side is at least twice that size are first shrunk
by an integer factor with PIL's box `reduce` (to no less than twice the resize target), which bounds the
cost of the resize and the bytes moved per image on huge web images without visible change.

Workers stop at uint8. Where the resize runs is a throughput choice:
- `resize_on_device=False` (default): workers resize and crop; items are (3, crop, crop).
- `resize_on_device=True`: workers only decode; items keep their decoded size and `DeviceTransform`
  resizes and crops each on the device. One H100 run (16 CPUs, ViT-H/14) measured it slower end to end
  (896 vs ~1090 img/s; both runs also paid a recompilation, see docs/embedding.md), so it is opt-in.
Normalisation always runs batched on the model's device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate
from torchvision.transforms import InterpolationMode, v2

from curation.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_rgb, read_record_bytes
from pretrain.normalise import IMAGENET_MEAN, IMAGENET_STD, BatchNormalise  # noqa: F401 (re-exported)


def resize_size(crop: int) -> int:
    return int(round(crop * 256 / 224))  # 224 -> 256, as in DINOv2's eval transform


def pre_reduce(img: Any, crop: int) -> Any:
    """Integer box downscale of a PIL image, keeping its short side >= 2x the resize target."""
    factor = min(img.size) // (2 * resize_size(crop))
    return img.reduce(factor) if factor >= 2 else img


def resize_crop(crop: int) -> v2.Compose:
    """uint8 tensor (3, H, W) on any device -> uint8 (3, crop, crop).

    On CPU torchvision's antialiased bicubic resize of uint8 tensors has a SIMD path about 4x faster than
    PIL's resize here (2.6 vs 11.6 ms for 500x375 -> 341x256 on one core).
    """
    return v2.Compose(
        [
            v2.Resize(resize_size(crop), interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(crop),
        ]
    )


class PreReduce:
    """`pre_reduce` as a picklable transform (for spawned DataLoader workers)."""

    def __init__(self, crop: int) -> None:
        self.crop = crop

    def __call__(self, img: Any) -> Any:
        return pre_reduce(img, self.crop)


def eval_transform_uint8(crop: int) -> v2.Compose:
    """PIL RGB image -> uint8 tensor (3, crop, crop): the whole geometric part of the eval transform."""
    return v2.Compose([PreReduce(crop), v2.PILToTensor(), resize_crop(crop)])


class DeviceTransform:
    """Batch from the loader -> normalised float32 (B, 3, crop, crop) on `device`.

    With `resize_on_device`, the loader's images are decoded but not resized: a list of uint8 images of any
    size (each copied asynchronously and resized on the device), or a stacked batch when they happen to share
    a size (resized in one call). Without, they arrive resized and stacked.
    """

    def __init__(self, crop: int, device: torch.device, resize_on_device: bool) -> None:
        self.device = device
        self.resize_on_device = resize_on_device
        self.resize_crop = resize_crop(crop)
        self.normalise = BatchNormalise(device)

    def __call__(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            batch = images.to(self.device, non_blocking=True)
            if self.resize_on_device:
                batch = self.resize_crop(batch)
        else:
            batch = torch.stack([self.resize_crop(im.to(self.device, non_blocking=True)) for im in images])
        return self.normalise(batch)


class ManifestImages(Dataset):
    """Item (i, source, member) -> (i, uint8 image, reason).

    The batch sampler hands each worker the rows it needs (manifest index, file or tar path, tar member),
    so the dataset holds no manifest: it pickles to a few bytes for spawn/forkserver workers, whatever the
    manifest's size. A row that cannot be read or decoded gives a zero image and its reason code instead of
    raising, so one bad file cannot stop a run of millions; the stage reports it.
    """

    def __init__(self, crop: int, max_pixels: int = DEFAULT_MAX_PIXELS, resize_on_device: bool = False) -> None:
        self.crop = crop
        self.max_pixels = max_pixels
        self.resize_on_device = resize_on_device
        self.to_tensor = v2.PILToTensor()
        self.resize_crop = resize_crop(crop)

    def __getitem__(self, item: tuple[int, str, str | None]) -> tuple[int, torch.Tensor, str]:
        i, source, member = item
        try:
            data = read_record_bytes({"source": source, "member": member})
            img = self.to_tensor(pre_reduce(decode_rgb(data, self.max_pixels), self.crop))
            return i, (img if self.resize_on_device else self.resize_crop(img)), ""
        except DecodeError as exc:
            reason = exc.reason
        except OSError as exc:  # file gone or unreadable since ingest
            reason = f"unreadable: {exc.__class__.__name__}"
        return i, torch.zeros(3, self.crop, self.crop, dtype=torch.uint8), reason


def collate(items: list[tuple[int, torch.Tensor, str]]) -> tuple[torch.Tensor, Any, list[str]]:
    """Stack same-size images; keep a list when sizes differ (resize_on_device)."""
    idx = torch.tensor([it[0] for it in items])
    images = [it[1] for it in items]
    same = all(im.shape == images[0].shape for im in images)
    return idx, (default_collate(images) if same else images), [it[2] for it in items]


def worker_init(_: int) -> None:
    # Decoding is PIL's C code; torch intra-op threads in every worker would only oversubscribe the CPUs.
    torch.set_num_threads(1)
