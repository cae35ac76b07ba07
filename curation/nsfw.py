"""NSFW scoring for pool hygiene with NudeNet's detector, which ships inside the nudenet wheel.

nudenet 3.x bundles `320n.onnx` (a YOLO-style detector of exposed/covered body parts) and runs it with
onnxruntime; nothing is downloaded. The image's NSFW score is the highest confidence among the classes
that make an image unsafe for a general pretraining pool (exposed genitalia, breasts, buttocks, anus);
feet, belly, armpits and faces do not count. Images scoring at or above the threshold are quarantined
by the dedup stage with reason `nsfw`.
"""

from __future__ import annotations

import threading

import numpy as np
from PIL import Image

UNSAFE = frozenset({
    "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
})
_local = threading.local()


def _detector():
    det = getattr(_local, "detector", None)
    if det is None:
        from nudenet import NudeDetector  # bundled model; onnxruntime session per thread

        det = NudeDetector()
        _local.detector = det
    return det


def detections(img: Image.Image) -> list[dict]:
    """NudeNet's raw detections: [{'class', 'score', 'box': [x, y, w, h]}]."""
    bgr = np.ascontiguousarray(np.asarray(img.convert("RGB"))[:, :, ::-1])
    return _detector().detect(bgr)


def nsfw_score(img: Image.Image) -> float:
    """Highest confidence of an unsafe class, 0.0 when there is none."""
    return max((d["score"] for d in detections(img) if d["class"] in UNSAFE), default=0.0)
