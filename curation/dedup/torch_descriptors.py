"""Learned copy descriptors: SSCD TorchScript models, and the embedding stage's ViT backbone.

SSCD (Pizzi et al. 2022) publishes TorchScript files that need no SSCD code: `torch.jit.load`. Its own
preprocessing is used: skew-resize to 320 x 320 (the README's batch-friendly alternative to a 288 short
edge), ImageNet mean/std, and the model's output L2-normalised. LVD-142M's thresholds (0.6 / 0.45) were
set for SSCD vectors. The ViT backbone (pretrain.models.load_backbone, any layout it reads) uses the
embedding stage's eval transform and its CLS token; it is a semantic, not a copy, descriptor, so expect to
raise the threshold.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from curation.dedup.descriptors import Descriptor
from lvdflow.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but no CUDA device is available")
    return dev


class _BatchedTorchDescriptor(Descriptor):
    """Buffers prepared uint8 tensors and runs the model a batch at a time."""

    def __init__(self, device: str | None, batch_size: int):
        self.device = _device(device)
        self.batch_size = batch_size
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self._lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def begin(self, n: int, work: Path) -> None:
        self.n = n
        self.out: np.ndarray | None = None
        self.buf_i: list[int] = []
        self.buf_x: list[torch.Tensor] = []

    def add(self, indices: list[int], items: list[torch.Tensor]) -> None:
        self.buf_i += indices
        self.buf_x += items
        while len(self.buf_i) >= self.batch_size:
            self._flush(self.batch_size)

    @torch.inference_mode()
    def _flush(self, count: int) -> None:
        ids, xs = self.buf_i[:count], self.buf_x[:count]
        self.buf_i, self.buf_x = self.buf_i[count:], self.buf_x[count:]
        if not ids:
            return
        x = torch.stack(xs).to(self.device).float().div_(255)
        x = (x - self.mean.to(self.device)) / self.std.to(self.device)
        v = self.forward(x).float()
        if v.ndim != 2:
            raise UserError(f"{self.name} model returned a tensor of shape {tuple(v.shape)}, expected (batch, dim)")
        v = torch.nn.functional.normalize(v, dim=1).cpu().numpy()
        if self.out is None:
            self.out = np.zeros((self.n, v.shape[1]), np.float32)
        self.out[ids] = v

    def finish(self) -> np.ndarray:
        self._flush(len(self.buf_i))
        return self.out if self.out is not None else np.zeros((self.n, 1), np.float32)


class SscdDescriptor(_BatchedTorchDescriptor):
    name = "sscd"

    def __init__(self, weights: Path, *, device: str | None = None, batch_size: int = 64, size: int = 320):
        super().__init__(device, batch_size)
        self.weights = Path(weights)
        self.size = size
        try:
            self.model = torch.jit.load(str(weights), map_location=self.device).eval()
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"{weights} is not a TorchScript model (SSCD's *.torchscript.pt files are): "
                            f"{str(exc).splitlines()[0]}") from None

    def params(self) -> dict[str, Any]:
        return {"descriptor": self.name, "weights": str(self.weights), "size": self.size}

    def prepare(self, img: Image.Image) -> torch.Tensor:
        img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class BackboneDescriptor(_BatchedTorchDescriptor):
    name = "backbone"

    def __init__(self, weights: Path, *, device: str | None = None, batch_size: int = 64, crop: int = 224):
        super().__init__(device, batch_size)
        from curation.embed_data import eval_transform_uint8
        from pretrain.models.checkpoint import load_backbone

        self.weights = Path(weights)
        self.crop = crop
        self.model = load_backbone(weights).to(self.device).eval()
        self.transform = eval_transform_uint8(crop)

    def params(self) -> dict[str, Any]:
        return {"descriptor": self.name, "weights": str(self.weights), "crop": self.crop}

    def prepare(self, img: Image.Image) -> torch.Tensor:
        return self.transform(img)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)["x_norm_clstoken"]
