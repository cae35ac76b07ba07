"""SIFT keypoints for the built-in copy detector: extraction, RootSIFT, and their mirror image.

Copies are resized, cropped, rotated a little, recoloured, blurred and re-compressed. Local gradient
features survive all of that (they are computed on grey levels, normalised for contrast, and located at
their own scale and orientation), which is why the built-in descriptor is built on them rather than on a
global hash. Images are first brought to one working size so that a 32 px icon and a 4000 px photo give
comparable numbers of keypoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

# SIFT's descriptor is 4x4 spatial cells x 8 orientation bins, laid out in the keypoint's own rotated
# frame. Mirroring the image left-right mirrors that frame: the cell rows swap end for end and every
# orientation bin o becomes -o. (Found by computing SIFT on an image and on its mirror at the mirrored
# keypoints; tests/test_dedup_builtin.py checks it.) With it a flipped copy is matched without
# extracting features twice.
_MIRROR_PERM = np.arange(128).reshape(4, 4, 8)[::-1][:, :, (-np.arange(8)) % 8].reshape(-1)


@dataclass
class LocalFeatures:
    xy: np.ndarray  # (n, 2) float32 keypoint positions in the working image
    desc: np.ndarray  # (n, 128) float32 RootSIFT, unit L2 norm
    size: tuple[int, int]  # (width, height) of the working image

    def mirrored(self) -> "LocalFeatures":
        """The features the left-right mirrored image would have."""
        if len(self.xy) == 0:
            return self
        xy = self.xy.copy()
        xy[:, 0] = (self.size[0] - 1) - xy[:, 0]
        return LocalFeatures(xy, np.ascontiguousarray(self.desc[:, _MIRROR_PERM]), self.size)


def working_gray(img: Image.Image, side: int) -> np.ndarray:
    """Grey levels at `side` pixels on the long edge (small images are enlarged, up to 8x)."""
    w, h = img.size
    scale = min(side / max(w, h), 8.0)
    if abs(scale - 1.0) > 1e-3:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    return np.asarray(img.convert("L"))


def root_sift(desc: np.ndarray) -> np.ndarray:
    """Hellinger-normalised SIFT (Arandjelovic & Zisserman 2012): L1-normalise, square-root.

    Comparing square-rooted histograms with L2 equals comparing the originals with the Hellinger kernel,
    which is markedly better for matching than raw SIFT. The result has unit L2 norm.
    """
    d = desc.astype(np.float32)
    d /= d.sum(axis=1, keepdims=True) + 1e-7
    return np.sqrt(d)


class SiftExtractor:
    """Keeps one cv2.SIFT per thread (OpenCV objects are not shared across threads safely)."""

    def __init__(self, side: int = 448, max_keypoints: int = 400, contrast: float = 0.02, tiles: int = 8):
        self.side = side
        self.max_keypoints = max_keypoints
        self.tiles = tiles  # CLAHE tile grid (tiles x tiles)
        # A lower contrast threshold than OpenCV's 0.04 keeps keypoints on blurred and low-contrast
        # copies, which are exactly the ones a default detector leaves almost empty.
        self.contrast = contrast

    def __call__(self, img: Image.Image) -> LocalFeatures:
        # Local contrast equalisation (CLAHE) first: dark, hazy and blurred photos, and copies whose
        # contrast was changed, then yield keypoints at the same places as their originals.
        clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(self.tiles, self.tiles))  # per call: not shared across threads
        gray = clahe.apply(working_gray(img, self.side))
        sift = cv2.SIFT_create(nfeatures=self.max_keypoints, contrastThreshold=self.contrast)
        kps, desc = sift.detectAndCompute(gray, None)
        if len(kps) < self.max_keypoints // 4:
            # Smooth photos (bokeh, sky, water) have little contrast anywhere: ask again with a far
            # lower threshold rather than describe the image by a handful of points.
            sift = cv2.SIFT_create(nfeatures=self.max_keypoints, contrastThreshold=self.contrast / 4)
            kps, desc = sift.detectAndCompute(gray, None)
        size = (gray.shape[1], gray.shape[0])
        if desc is None or len(kps) == 0:
            return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), size)
        # nfeatures keeps the strongest responses but can return a few more on ties; cap exactly.
        kps, desc = kps[: self.max_keypoints], desc[: self.max_keypoints]
        xy = np.array([k.pt for k in kps], dtype=np.float32)
        return LocalFeatures(xy, root_sift(desc), size)
