"""Folders of random-noise images for tests that need real files but not real content."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def noise_images(folder: Path, n: int, size: tuple[int, int] = (24, 24), seed: int = 0,
                 name: str = "{i:03d}.png") -> Path:
    """`n` RGB noise images of `size` (height, width) in `folder` (created), named by `name`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / name.format(i=i))
    return folder
