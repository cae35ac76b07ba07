"""Small real photos (scikit-image ships them) and copies of them, for the dedup tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import skimage.data as skd
from PIL import Image, ImageOps


def photo(name: str, side: int = 192) -> Image.Image:
    img = Image.fromarray(getattr(skd, name)()).convert("RGB")
    s = side / max(img.size)
    return img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.LANCZOS)


def textured(seed: int, side: int = 160) -> Image.Image:
    """A distinct random picture (blurred noise blobs): unrelated to every other seed."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)


def save_jpeg(img: Image.Image, path: Path, quality: int = 70) -> None:
    img.convert("RGB").save(path, "JPEG", quality=quality)


def make_pool(root: Path) -> dict[str, str]:
    """A pool with planted duplicates. Returns {file name: family}; families of one are singletons."""
    root.mkdir(parents=True, exist_ok=True)
    fam = {}
    astro, cat, coffee, rocket = photo("astronaut"), photo("chelsea"), photo("coffee"), photo("rocket")
    astro.save(root / "astro.png"); fam["astro.png"] = "astro"
    astro.save(root / "astro_again.png"); fam["astro_again.png"] = "astro"  # exact duplicate
    save_jpeg(astro.resize((120, 120)), root / "astro_small.jpg", 40); fam["astro_small.jpg"] = "astro"
    save_jpeg(ImageOps.mirror(astro.crop((10, 15, 180, 185))), root / "astro_cropflip.jpg"); fam["astro_cropflip.jpg"] = "astro"
    cat.save(root / "cat.png"); fam["cat.png"] = "cat"
    save_jpeg(ImageOps.grayscale(cat.rotate(6)).convert("RGB"), root / "cat_gray_rot.jpg"); fam["cat_gray_rot.jpg"] = "cat"
    coffee.save(root / "coffee.png"); fam["coffee.png"] = "coffee"
    rocket.save(root / "rocket.png"); fam["rocket.png"] = "rocket"
    for s in range(2):
        textured(s).save(root / f"noise{s}.png"); fam[f"noise{s}.png"] = f"noise{s}"
    return fam
