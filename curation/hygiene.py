"""Pool hygiene after dedup: NSFW quarantine and face boxes, on the images dedup keeps.

Both are switchable and run only on kept images (removed copies never reach the shards). An image whose
NSFW score reaches the threshold is turned into a quarantine row: keep = False, reason `nsfw`. Face
boxes go into the `faces` column for the shard writer to blur (curation.faces.blur_boxes).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from curation.dedup.inputs import Record


def apply_hygiene(records: list[Record], rows: list[dict], *, nsfw: bool, nsfw_threshold: float, faces: bool,
                  face_min_size: int = 24, threads: int | None = None,
                  scorer=None, face_detector=None) -> dict[str, Any]:
    """Fill rows' `nsfw_score` / `faces` in place; returns counts for the stage manifest.

    `scorer` and `face_detector` default to NudeNet and OpenCV's cascade; tests may pass their own.
    """
    from curation.decode import decode_rgb

    if nsfw and scorer is None:
        from curation.nsfw import nsfw_score as scorer
    if faces and face_detector is None:
        from curation.faces import detect_faces

        def face_detector(img):
            return detect_faces(img, min_size=face_min_size)

    for row in rows:
        if nsfw:
            row["nsfw_score"] = None
        if faces:
            row["faces"] = None
    todo = [i for i, row in enumerate(rows) if row["keep"]]

    def work(i: int) -> tuple[int, float | None, list | None]:
        img = decode_rgb(records[i].read_bytes())
        return i, (float(scorer(img)) if nsfw else None), (face_detector(img) if faces else None)

    n_nsfw = n_faces = 0
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        for i, score, boxes in pool.map(work, todo):
            row = rows[i]
            if nsfw:
                row["nsfw_score"] = score
                if score >= nsfw_threshold:
                    row["keep"], row["reason"] = False, "nsfw"
                    row["detail"] = f"NSFW score {score:.3f} >= {nsfw_threshold}"
                    n_nsfw += 1
            if faces:
                row["faces"] = boxes or []
                n_faces += bool(boxes)
    out: dict[str, Any] = {}
    if nsfw:
        out["nsfw_quarantined"] = n_nsfw
    if faces:
        out["images_with_faces"] = n_faces
    return out
