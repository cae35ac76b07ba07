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


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    import io

    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_blurred_compressed_copy_of_fine_texture_verifies_on_the_coarse_scale(tmp_path):
    from PIL import ImageFilter

    from curation.dedup.builtin import BuiltinDescriptor

    grass = photo("grass", 512)
    copy = _jpeg(grass.filter(ImageFilter.GaussianBlur(4)).resize((256, 256)), 25)
    other = _jpeg(photo("gravel", 512).filter(ImageFilter.GaussianBlur(4)).resize((256, 256)), 25)
    # the fine keypoints of the copy land on compression noise: too few consistent matches there
    d = BuiltinDescriptor(threads=1)
    assert inlier_count(d.extract(grass), d.extract(copy)) < 8
    d.begin(3, tmp_path)
    d.add([0, 1, 2], [d.prepare(im) for im in (grass, copy, other)])
    assert d.finish().shape[0] == 3
    s = d.pair_scores(np.array([0, 0, 1]), np.array([1, 2, 2]), np.ones(3, np.float32))
    assert s[0] >= 0.6  # the coarse scale finds the copy
    assert s[1] < 0.45 and s[2] < 0.45  # another texture blurred alike is not a copy


def test_matches_filling_one_word_sized_patch_are_not_a_copy():
    # An overlaid word in a large font (the benchmark's text edit: 6-15 % of the height) gives matches
    # that fill a compact patch rather than one thin line. Matches on such a word (4 rows over 10 % of
    # the long edge: smaller spread 0.037 of it) are rejected; a copy's matches spread over the picture.
    from curation.dedup.verify import _thin

    size = (400, 300)
    gx, gy = np.meshgrid(np.linspace(100, 280, 8), np.linspace(100, 140, 4))
    word = np.stack([gx.ravel(), gy.ravel()], axis=1)
    picture = np.random.default_rng(0).uniform((20, 20), (380, 280), (12, 2))
    assert _thin(word, size)
    assert not _thin(picture, size)
