"""Geometric verification: are two images related by a crop/resize/rotation/flip of each other?

A copy and its original share many local features *at consistent positions*: one similarity transform
(scale, rotation, shift) maps the matched keypoints of one onto the other. Two different images, even
two neighbouring crops of one photo or two photos of the same texture, give a few chance matches but no
large consistent set. RANSAC counts the matches that agree with one similarity transform; the mirrored
features of the second image are tried too, which covers horizontal flips.
"""

from __future__ import annotations

import cv2
import numpy as np

from curation.dedup.local_features import LocalFeatures

RATIO = 0.8  # Lowe's ratio test: keep a match only when clearly better than the second best
RANSAC_PX = 6.0  # reprojection tolerance in working-image pixels (long edge ~448)
MIN_SCALE, MAX_SCALE = 1 / 8, 8.0  # copies are resized at most this much relative to each other
MIN_SPREAD = 0.04  # see _thin
MIN_ELONGATION = 0.12  # see _thin


def _matches(a: LocalFeatures, b: LocalFeatures) -> tuple[np.ndarray, np.ndarray]:
    """Ratio-test matches from a to b, one-to-one on b's side: (src xy in a, dst xy in b)."""
    if len(a.desc) < 2 or len(b.desc) < 2:
        return np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)
    # Descriptors are unit vectors: squared L2 distance = 2 - 2 cos, so one matrix product gives every
    # distance (several times faster than OpenCV's brute-force matcher plus a Python loop over its
    # matches, and the same matches).
    sim = a.desc @ b.desc.T
    rows = np.arange(len(sim))
    best = sim.argmax(axis=1)
    s1 = sim[rows, best]
    sim[rows, best] = -np.inf
    s2 = sim.max(axis=1)
    d1 = np.sqrt(np.maximum(2.0 - 2.0 * s1, 0.0))
    d2 = np.sqrt(np.maximum(2.0 - 2.0 * s2, 0.0))
    ok = np.flatnonzero(d1 < RATIO * d2)  # Lowe's ratio test
    # one-to-one on the target side (repeated patterns otherwise vote many times): the first query,
    # in query order, keeps a target
    _, first = np.unique(best[ok], return_index=True)
    ok = ok[np.sort(first)]
    return (np.ascontiguousarray(a.xy[ok], dtype=np.float32).reshape(-1, 2),
            np.ascontiguousarray(b.xy[best[ok]], dtype=np.float32).reshape(-1, 2))


def _thin(pts: np.ndarray, size: tuple[int, int]) -> bool:
    """True when points lie along a line or in one spot rather than over an area of the image.

    An overlaid caption, a watermark or a logo is the same on unrelated images and yields many matches
    that one transform explains, but they all lie on one line of text. A copy's matches spread over the
    picture in both directions. The test: the smaller principal spread (standard deviation) of the
    points must reach MIN_SPREAD of the image's long edge and MIN_ELONGATION of the larger spread.
    MIN_SPREAD is 0.04: on bench/bench_dedup.py's copy set the same overlaid word on two unrelated
    images (its text edit draws from ten words) gave 8-13 consistent matches with a smaller spread of
    0.017-0.035, while 99 % of true copy pairs spread wider than 0.032 and the rest are linked to
    their family by other pairs (0.03 -> 0.04 costs 0.2 % of the reachable pairwise recall).
    """
    if len(pts) < 3:
        return True
    eig = np.linalg.eigvalsh(np.cov(pts.T.astype(np.float64)))
    minor, major = float(np.sqrt(max(eig[0], 0.0))), float(np.sqrt(max(eig[1], 0.0)))
    return minor < MIN_SPREAD * max(size) or minor < MIN_ELONGATION * major


def _inliers(src: np.ndarray, dst: np.ndarray, size_a: tuple[int, int], size_b: tuple[int, int],
             px: float = RANSAC_PX) -> int:
    if len(src) < 3:
        return 0
    model, mask = cv2.estimateAffinePartial2D(
        src, dst, method=cv2.RANSAC, ransacReprojThreshold=px, maxIters=2000, confidence=0.995
    )
    if model is None or mask is None:
        return 0
    scale = float(np.hypot(model[0, 0], model[1, 0]))
    if not (MIN_SCALE <= scale <= MAX_SCALE):
        return 0
    inl = mask.ravel().astype(bool)
    if _thin(src[inl], size_a) or _thin(dst[inl], size_b):
        return 0
    return int(inl.sum())


def inlier_count(a: LocalFeatures, b: LocalFeatures, mirrored_b: LocalFeatures | None = None, *,
                 px: float = RANSAC_PX) -> int:
    """Largest number of RANSAC inliers between a and b, or a and b's mirror image.

    `px` is the reprojection tolerance in working-image pixels (RANSAC_PX suits a ~448 px long edge).
    """
    best = _inliers(*_matches(a, b), a.size, b.size, px)
    mb = mirrored_b if mirrored_b is not None else b.mirrored()
    if best < 64:  # a clear direct match needs no mirror test
        best = max(best, _inliers(*_matches(a, mb), a.size, mb.size, px))
    return best


def inliers_to_score(inliers: np.ndarray | int, tau: float = 8.73) -> np.ndarray:
    """Map an inlier count to a similarity in [0, 1): 1 - exp(-n / tau).

    This puts verified pairs on the scale of a cosine similarity so LVD's thresholds keep their roles:
    0.6 (self-dedup) means at least 8 consistent matches, 0.45 (decontamination, removes more) at least
    6. Calibrated on bench/bench_dedup.py's copy set: true copies of low-texture photos and simple
    drawings often verify with 7-11 inliers, while its hardest negatives (other regions of the same
    photo) reached at most 6, and only drawings sharing a template (card decks, icon themes) went higher.
    """
    n = np.asarray(inliers, dtype=np.float32)
    return (1.0 - np.exp(-n / tau)).astype(np.float32)
