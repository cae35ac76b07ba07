"""Face detection and blurring for pool hygiene (LVD-142M blurred identifiable faces in its pool).

Detection uses OpenCV's frontal-face Haar cascade, which ships inside the opencv-python-headless wheel
(cv2.data.haarcascades): nothing is downloaded at run time. Boxes are found on a copy no larger than
`max_side` (the cascade is slow on 4000 px photos and faces that small there would not be recognisable)
and scaled back to the image's own pixels. The dedup stage records them per image ([x, y, w, h]); the
shard writer calls `blur_boxes` so stored images carry blurred faces.
"""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CASCADE = "haarcascade_frontalface_default.xml"
_local = threading.local()  # CascadeClassifier is not safe to share between threads


def cascade_path() -> Path:
    return Path(cv2.data.haarcascades) / CASCADE


def _cascade() -> cv2.CascadeClassifier:
    c = getattr(_local, "cascade", None)
    if c is None:
        c = cv2.CascadeClassifier(str(cascade_path()))
        if c.empty():
            raise RuntimeError(f"OpenCV face cascade missing or unreadable: {cascade_path()}")
        _local.cascade = c
    return c


def detect_faces(img: Image.Image, *, min_size: int = 24, min_neighbors: int = 5,
                 max_side: int = 1024) -> list[list[int]]:
    """Face boxes [x, y, w, h] in `img`'s pixels, sorted by position (deterministic)."""
    w, h = img.size
    scale = min(1.0, max_side / max(w, h))
    small = img if scale == 1.0 else img.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                 Image.Resampling.BILINEAR)
    gray = cv2.equalizeHist(np.asarray(small.convert("L")))
    found = _cascade().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=min_neighbors,
                                        minSize=(max(1, round(min_size * scale)),) * 2)
    boxes = []
    for x, y, bw, bh in (found if len(found) else []):
        boxes.append([int(round(x / scale)), int(round(y / scale)), int(round(bw / scale)), int(round(bh / scale))])
    return sorted(boxes)


def blur_boxes(img: Image.Image, boxes: list[list[int]] | None, *, grow: float = 0.15) -> Image.Image:
    """A copy of `img` with every box (grown by `grow` on each side) blurred beyond recognition.

    The blur radius scales with the box, so a large face is as unreadable as a small one; an elliptical
    mask keeps the edit to the face rather than a visible rectangle.
    """
    if not boxes:
        return img
    out = img.copy()
    W, H = img.size
    for x, y, w, h in boxes:
        gx, gy = round(w * grow), round(h * grow)
        x0, y0 = max(0, x - gx), max(0, y - gy)
        x1, y1 = min(W, x + w + gx), min(H, y + h + gy)
        if x1 <= x0 or y1 <= y0:
            continue
        region = out.crop((x0, y0, x1, y1))
        # downscale then blur: removes identity even for large faces, at little cost
        small = region.resize((max(1, (x1 - x0) // 8), max(1, (y1 - y0) // 8)), Image.Resampling.BILINEAR)
        blurred = small.resize(region.size, Image.Resampling.BILINEAR).filter(
            ImageFilter.GaussianBlur(max(2.0, max(w, h) / 12)))
        mask = Image.new("L", region.size, 0)
        ImageDraw.Draw(mask).ellipse((0, 0, region.width - 1, region.height - 1), fill=255)
        out.paste(blurred, (x0, y0), mask)
    return out
