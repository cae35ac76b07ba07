"""Pool hygiene plumbing: OpenCV face boxes and blurring, NudeNet scoring, quarantine rows.

What is and is not tested: face detection runs the real bundled cascade on a real face photo
(scikit-image's astronaut). The NSFW model is run for real, but only on benign photos (no explicit
images ship anywhere here), so the quarantine path is tested with a stub scorer.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from curation.faces import blur_boxes, cascade_path, detect_faces
from tests.dedup_helpers import photo


def test_face_detector_finds_the_astronaut_face_and_no_face_in_coffee():
    assert cascade_path().is_file()  # ships inside opencv-python-headless
    img = photo("astronaut", 512)
    boxes = detect_faces(img)
    assert len(boxes) == 1
    x, y, w, h = boxes[0]
    cx, cy = x + w / 2, y + h / 2
    assert 180 < cx < 270 and 80 < cy < 170  # the face of skimage's astronaut at 512 px
    assert detect_faces(photo("coffee", 512)) == []


def test_face_boxes_scale_back_to_the_original_pixels():
    big = photo("astronaut", 1024)
    (x, y, w, h), = detect_faces(big, max_side=512)
    assert 360 < x + w / 2 < 540 and 160 < y + h / 2 < 340


def test_blur_boxes_changes_only_the_face():
    img = photo("astronaut", 512)
    box = detect_faces(img)[0]
    out = blur_boxes(img, [box])
    a, b = np.asarray(img, np.float32), np.asarray(out, np.float32)
    x, y, w, h = box
    inside = np.abs(a[y + h // 4:y + 3 * h // 4, x + w // 4:x + 3 * w // 4] - b[y + h // 4:y + 3 * h // 4, x + w // 4:x + 3 * w // 4])
    assert inside.mean() > 8  # visibly blurred
    assert np.array_equal(a[:, : max(0, x - w)], b[:, : max(0, x - w)])  # far left untouched
    assert blur_boxes(img, []) is img


def test_nsfw_model_runs_and_scores_benign_photos_low():
    from curation.nsfw import detections, nsfw_score

    img = photo("astronaut", 320)
    dets = detections(img)
    assert any(d["class"].startswith("FACE") for d in dets)  # the bundled model really ran
    assert nsfw_score(img) < 0.2
    assert nsfw_score(photo("coffee", 320)) < 0.2


def test_hygiene_quarantines_high_scores_and_records_faces(tmp_path):
    from curation.dedup.inputs import load_input
    from curation.hygiene import apply_hygiene

    pool = tmp_path / "pool"
    pool.mkdir()
    photo("astronaut", 256).save(pool / "a.png")
    photo("coffee", 256).save(pool / "b.png")
    photo("rocket", 256).save(pool / "c.png")
    root, recs = load_input(pool)
    rows = [{"path": r.path, "keep": True, "reason": None, "detail": None} for r in recs]
    rows[2]["keep"], rows[2]["reason"] = False, "near-copy"
    scores = {"a.png": 0.1, "b.png": 0.95, "c.png": 0.99}
    # one thread: kept images are scored in row order, so the stub can tell which image it sees
    order = iter(["a.png", "b.png"])
    out = apply_hygiene(recs, rows, nsfw=True, nsfw_threshold=0.6, faces=True, threads=1,
                        scorer=lambda img: scores[next(order)])
    assert out == {"nsfw_quarantined": 1, "images_with_faces": 1}
    assert rows[0]["keep"] and rows[0]["faces"] and rows[0]["nsfw_score"] == 0.1
    assert not rows[1]["keep"] and rows[1]["reason"] == "nsfw" and "0.950" in rows[1]["detail"]
    assert rows[2]["nsfw_score"] is None and rows[2]["reason"] == "near-copy"  # removed copies are not scanned


def test_stage_writes_face_and_nsfw_columns(tmp_path):
    from curation.dedup.stage import run_dedup

    pool = tmp_path / "pool"
    pool.mkdir()
    photo("astronaut", 256).save(pool / "a.png")
    photo("coffee", 256).save(pool / "b.png")
    m = run_dedup(pool, tmp_path / "out", nsfw=True, faces=True, threads=1)
    rows = {r["path"]: r for r in pq.read_table(tmp_path / "out" / "dedup.parquet").to_pylist()}
    assert len(rows["a.png"]["faces"]) == 1 and rows["b.png"]["faces"] == []
    assert rows["a.png"]["nsfw_score"] < 0.2 and rows["a.png"]["keep"]
    assert m["images_with_faces"] == 1 and m["nsfw_quarantined"] == 0
