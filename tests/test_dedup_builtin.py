"""The built-in copy detector's parts: mirrored SIFT, geometric verification, VLAD."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from curation.dedup.local_features import SiftExtractor
from curation.dedup.verify import inlier_count, inliers_to_score
from curation.dedup.vlad import Vlad, train_codebook
from tests.dedup_helpers import photo, textured

EXTRACT = SiftExtractor(side=320, max_keypoints=300)


def test_mirrored_features_match_features_of_the_mirrored_image():
    img = photo("astronaut", 256)
    f = EXTRACT(img)
    g = EXTRACT(ImageOps.mirror(img))
    m = f.mirrored()
    # every mirrored descriptor has a near-identical twin among the flipped image's own descriptors
    # at the mirrored position; without the permutation they would not
    d_perm = np.linalg.norm(m.desc[:, None] - g.desc[None], axis=2)
    d_raw = np.linalg.norm(f.desc[:, None] - g.desc[None], axis=2)
    close_pos = np.linalg.norm(m.xy[:, None] - g.xy[None], axis=2) < 1.5
    best_perm = np.where(close_pos, d_perm, 9).min(axis=1)
    best_raw = np.where(close_pos, d_raw, 9).min(axis=1)
    has = close_pos.any(axis=1)
    assert has.sum() > 50
    assert np.median(best_perm[has]) < 0.15 < np.median(best_raw[has])


def test_verification_accepts_copies_and_rejects_other_images():
    cat = photo("chelsea", 300)
    copies = [
        cat.resize((150, 100)),
        ImageOps.mirror(cat.crop((30, 20, 260, 190))),
        ImageOps.grayscale(cat.rotate(8, expand=True)).convert("RGB"),
        ImageOps.expand(cat, border=30, fill=(200, 0, 0)),
    ]
    f = EXTRACT(cat)
    for c in copies:
        assert inliers_to_score(inlier_count(f, EXTRACT(c))) >= 0.6
    for other in (photo("coffee", 300), photo("astronaut", 300), textured(3, 300)):
        assert inliers_to_score(inlier_count(f, EXTRACT(other))) < 0.45


def _with_caption(img: Image.Image, text: str) -> Image.Image:
    img = img.copy()
    try:
        font = ImageFont.truetype("DejaVuSans-Bold.ttf", 28)
    except OSError:
        font = ImageFont.load_default(size=28)
    ImageDraw.Draw(img).text((20, img.height // 2), text, fill=(255, 255, 0), font=font)
    return img


def test_same_caption_on_two_different_images_is_not_a_copy():
    # the caption alone yields matches consistent with one transform, but along a single line
    a = _with_caption(photo("coffee", 320), "copyright 2024 watermark")
    b = _with_caption(textured(5, 320), "copyright 2024 watermark")
    assert inliers_to_score(inlier_count(EXTRACT(a), EXTRACT(b))) < 0.45


def test_vlad_vectors_are_unit_and_flip_symmetric_sum_is_flip_invariant():
    feats = [EXTRACT(photo(n, 200)) for n in ("astronaut", "chelsea", "coffee", "rocket")]
    cb = train_codebook(np.concatenate([f.desc for f in feats]), 8)
    v = Vlad(cb)
    a = v.encode(feats[0].desc)
    assert abs(np.linalg.norm(a) - 1) < 1e-4
    sym = v.encode(feats[0].desc) + v.encode(feats[0].mirrored().desc)
    sym_flipped = v.encode(feats[0].mirrored().desc) + v.encode(feats[0].mirrored().mirrored().desc)
    assert np.allclose(sym, sym_flipped, atol=1e-5)
    assert np.all(v.encode(np.zeros((0, 128), np.float32)) == 0)
