"""DINOv2 multi-crop augmentation with torchvision transforms v2: 2 global crops and N local crops.

Per crop: RandomResizedCrop (bicubic) + horizontal flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8,
grayscale p=0.2, then Gaussian blur (kernel 9, sigma 0.1-2) and, on the second global crop, solarisation
(threshold 128, p=0.2). Crops stay uint8, as every transform here computes them: the ImageNet normalisation
runs once per batch on the model's device (`pretrain.normalise.normalise_crops`, called by `loop.to_device`),
which saves the per-crop conversion (2.4-4.2 ms of one core per image at the recipe's crop sizes, measured
on this project's 2-core host on two days) and sends a quarter of float32's bytes.

Blur probabilities (`blur_probabilities`):
- "paper" (default): global crop 1 always blurred (p=1.0), global crop 2 with p=0.1, local crops p=0.5 —
  the BYOL recipe the DINO/DINOv2 papers describe.
- "official": what the released DINOv2/DINOv3 checkpoints were actually trained with. The official
  `GaussianBlur(p)` passes `1 - p` to `RandomApply`, inverting the probabilities: global crop 1 is never
  blurred, global crop 2 is blurred 90% of the time, locals 50% (dinov2 PR #411, dinov3 issue #286).
  Choose it to match the released models' training distribution.

Blur sigma (`blur_sigma`, pixels): (0.1, 2.0) as in the papers, which is meant for 224 px crops. Blur is
measured in pixels, so on small crops the same sigma removes far more of the image: sigma 2 on a 24 px crop
is like sigma 19 on a 224 px one. Small-image profiles should scale it with the crop size.

Randomness is torch's global RNG (torchvision's transforms draw from it); the trainer seeds it per batch
from (run seed, iteration, rank), which makes resumed runs draw the same crops.
"""

from __future__ import annotations

from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

BLUR_PROBABILITIES = {
    "paper": {"global1": 1.0, "global2": 0.1, "local": 0.5},
    "official": {"global1": 0.0, "global2": 0.9, "local": 0.5},
}


def _blur(p: float, sigma) -> v2.Transform:
    return v2.RandomApply([v2.GaussianBlur(kernel_size=9, sigma=tuple(sigma))], p=p)


class MultiCropAugmentation:
    """Callable: PIL image (or uint8 CHW tensor) -> {"global_crops": [2 uint8 CHW tensors], "local_crops": [N]}."""

    def __init__(self, global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32), local_crops_number: int = 8,
                 global_crops_size: int = 224, local_crops_size: int = 96, blur_probabilities: str = "paper",
                 color_jitter=(0.4, 0.4, 0.2, 0.1), blur_sigma=(0.1, 2.0)):
        if blur_probabilities not in BLUR_PROBABILITIES:
            raise ValueError(f"blur_probabilities must be one of {sorted(BLUR_PROBABILITIES)}, "
                             f"got {blur_probabilities!r}")
        probs = BLUR_PROBABILITIES[blur_probabilities]
        if len(blur_sigma) != 2 or not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma must be (min, max) with 0 < min <= max, got {blur_sigma!r}")
        self.local_crops_number = local_crops_number
        self.global_crops_size = global_crops_size
        self.local_crops_size = local_crops_size

        # Once per image, not per crop (10 conversions were ~6% of an image's augmentation time).
        # RGB: grayscale sources become 3-channel, so every crop has the backbone's channels.
        self.to_tensor = v2.Compose([v2.ToImage(), v2.RGB()])

        def geometric(size, scale):
            return v2.Compose([
                v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True),
                v2.RandomHorizontalFlip(p=0.5),
            ])

        colour = v2.Compose([
            # (brightness, contrast, saturation, hue); zeros skip a component (saturation and hue do nothing
            # on grayscale data and hue is the costliest part on CPU).
            v2.RandomApply([v2.ColorJitter(*(c or None for c in color_jitter))], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ])
        self.global1 = v2.Compose([geometric(global_crops_size, global_crops_scale), colour,
                                   _blur(probs["global1"], blur_sigma)])
        # Solarisation's threshold (128) is in uint8 values.
        self.global2 = v2.Compose([geometric(global_crops_size, global_crops_scale), colour,
                                   _blur(probs["global2"], blur_sigma), v2.RandomSolarize(threshold=128, p=0.2)])
        self.local = v2.Compose([geometric(local_crops_size, local_crops_scale), colour,
                                 _blur(probs["local"], blur_sigma)])

    def __call__(self, image) -> dict:
        image = self.to_tensor(image)
        return {
            "global_crops": [self.global1(image), self.global2(image)],
            "local_crops": [self.local(image) for _ in range(self.local_crops_number)],
        }
