"""Ingest keeps every good image and quarantines every bad input with the right reason."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.decode import decode_rgb
from curation.ingest import run_ingest
from lvdflow.errors import UserError


def _img(w=48, h=40, mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode) if mode != "RGB" else Image.fromarray(arr, "RGB")


def _enc(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _add_member(tf: tarfile.TarFile, name: str, data: bytes = b"", *, symlink_to: str | None = None) -> None:
    info = tarfile.TarInfo(name)
    if symlink_to is not None:
        info.type, info.linkname = tarfile.SYMTYPE, symlink_to
        tf.addfile(info)
    else:
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A folder, a tar shard and a path list holding good, awkward and broken inputs."""
    root = tmp_path_factory.mktemp("corpus")
    folder = root / "folder"
    (folder / "sub" / "deeper").mkdir(parents=True)
    good, bad = {}, {}

    def put(rel: str, data: bytes, expect: str | None) -> None:
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        (bad if expect else good)[str(p.resolve())] = expect

    put("plain.jpg", _enc(_img(seed=1), "JPEG"), None)
    put("sub/plain.png", _enc(_img(seed=2), "PNG"), None)
    put("sub/deeper/cmyk.jpg", _enc(_img(seed=3, mode="CMYK"), "JPEG"), None)
    put("palette.png", _enc(_img(seed=4).convert("P", palette=Image.ADAPTIVE), "PNG"), None)
    put("la.png", _enc(_img(seed=5).convert("LA"), "PNG"), None)
    put("rgba.png", _enc(_img(seed=6).convert("RGBA"), "PNG"), None)
    put("gray16.png", _enc(Image.fromarray(np.full((40, 48), 40000, np.uint16)), "PNG"), None)
    exif = Image.Exif()
    exif[0x0112] = 6
    put("exif_rotated.jpg", _enc(_img(60, 30, seed=7), "JPEG", exif=exif.tobytes()), None)
    frames = [_img(seed=8), _img(seed=9)]
    put("animated.gif", _enc(frames[0], "GIF", save_all=True, append_images=frames[1:]), None)
    put("webp.webp", _enc(_img(seed=10), "WEBP"), None)

    jpeg = _enc(_img(120, 120, seed=11), "JPEG", quality=95)
    png = _enc(_img(120, 120, seed=12), "PNG")
    put("zero.jpg", b"", "zero-byte")
    put("truncated.jpg", jpeg[: len(jpeg) // 2], "truncated")
    put("truncated.png", png[: len(png) // 2], "truncated")
    put("notes.txt", b"just some text\n", "not-an-image")
    put("fake.png", os.urandom(1000), "not-an-image")
    put("bomb.png", _enc(Image.new("1", (11000, 11000)), "PNG"), "decompression-bomb")
    put("tiny.png", _enc(_img(8, 8), "PNG"), "too-small")
    # a valid PNG signature and header followed by garbage chunk data. Fixed bytes, not random ones: about
    # 1 random IDAT in 270 starts a valid zlib stream that then ends early, which is rightly "truncated".
    put("corrupt.png", png[:33] + b"\x00\x00\x00\x10IDAT" + bytes(range(40)), "corrupt")

    outside = root / "outside.jpg"
    outside.write_bytes(jpeg)
    (folder / "escape.jpg").symlink_to(outside)
    bad[str(folder.resolve() / "escape.jpg")] = "symlink-escape"
    (folder / "dangling.jpg").symlink_to(root / "nothing-here.jpg")
    bad[str(folder.resolve() / "dangling.jpg")] = "broken-symlink"
    (folder / "inside_link.jpg").symlink_to(folder / "plain.jpg")
    good[str(folder.resolve() / "inside_link.jpg")] = None
    os.mkfifo(folder / "pipe.jpg")
    bad[str(folder.resolve() / "pipe.jpg")] = "special-file"

    tar_path = root / "shard-000000.tar"
    with tarfile.open(tar_path, "w") as tf:
        _add_member(tf, "s1.jpg", _enc(_img(seed=13), "JPEG"))
        _add_member(tf, "s1.json", b'{"caption": "side file"}')
        _add_member(tf, "s2.png", _enc(_img(seed=14), "PNG"))
        _add_member(tf, "/etc/evil.jpg", jpeg)
        _add_member(tf, "../evil.jpg", jpeg)
        _add_member(tf, "link.jpg", symlink_to="/etc/passwd")
        _add_member(tf, "s3.jpg", b"")
        _add_member(tf, "s4.avif", _enc(_img(seed=16), "AVIF"))  # not a side file: an image Pillow decodes
        _add_member(tf, "s5.heic", os.urandom(500))  # an image this machine cannot open: quarantined, not lost
    t = str(tar_path.resolve())
    good.update({f"{t}!/s1.jpg": None, f"{t}!/s2.png": None, f"{t}!/s4.avif": None})
    bad.update({f"{t}!//etc/evil.jpg": "unsafe-tar-path", f"{t}!/../evil.jpg": "unsafe-tar-path",
                f"{t}!/link.jpg": "tar-link-member", f"{t}!/s3.jpg": "zero-byte", f"{t}!/s5.heic": "not-an-image"})

    broken_tar = root / "broken.tar"
    broken_tar.write_bytes(tar_path.read_bytes()[:700])  # cut inside the second member
    bad[str(broken_tar.resolve())] = "unreadable-tar"

    (root / "listed.png").write_bytes(_enc(_img(seed=15), "PNG"))
    (root / "adir").mkdir()
    pq.write_table(pa.table({"path": ["listed.png", "missing.png", "https://example.com/a.jpg", "listed.png",
                                      str(root / "adir"), ""]}), root / "list.parquet")
    good[str((root / "listed.png").resolve())] = None
    bad.update({str(root / "missing.png"): "missing-file", "https://example.com/a.jpg": "remote-uri",
                str(root / "adir"): "unreadable"})
    return {"root": root, "folder": folder, "tar": tar_path, "broken_tar": broken_tar,
            "list": root / "list.parquet", "good": good, "bad": bad}


@pytest.fixture(scope="module")
def ingested(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ingest") / "out"
    m = run_ingest([corpus["folder"], corpus["tar"], corpus["broken_tar"], corpus["list"]], out, workers=2)
    return m, pq.read_table(out / "manifest.parquet").to_pylist(), pq.read_table(out / "quarantine.parquet").to_pylist()


def test_every_good_image_is_kept(corpus, ingested):
    _, rows, _ = ingested
    kept = {r["uri"] for r in rows}
    missing = set(corpus["good"]) - kept
    assert not missing, f"good images dropped: {missing}"


def test_every_bad_input_gets_its_reason(corpus, ingested):
    _, _, quarantine = ingested
    got = {q["uri"]: q["reason"] for q in quarantine}
    for uri, reason in corpus["bad"].items():
        assert got.get(uri) == reason, f"{uri}: expected {reason}, got {got.get(uri)}"
    kinds = {r for r in corpus["bad"].values()}
    assert len(kinds) >= 12, kinds
    # the duplicate and empty rows of the list are quarantined too, not dropped
    reasons = [q["reason"] for q in quarantine]
    assert "duplicate-entry" in reasons and "empty-list-entry" in reasons


def test_nothing_lost(ingested):
    manifest, rows, quarantine = ingested
    c = manifest["counts"]
    assert c["images"] == len(rows) and c["quarantined"] == len(quarantine)
    assert c["tar_sidecar_members"] == 1  # the .json side file of the tar is counted, not an image


def test_awkward_images_normalised(ingested):
    _, rows, _ = ingested
    by_name = {Path(r["relpath"]).name: r for r in rows}
    assert by_name["cmyk.jpg"]["mode"] == "CMYK"
    assert by_name["gray16.png"]["mode"].startswith("I")
    assert by_name["animated.gif"]["frames"] == 2
    # EXIF orientation 6 turns the stored 60x30 into 30x60
    assert (by_name["exif_rotated.jpg"]["width"], by_name["exif_rotated.jpg"]["height"]) == (30, 60)
    img = decode_rgb(Path(by_name["gray16.png"]["source"]).read_bytes())
    assert img.mode == "RGB" and abs(int(np.asarray(img)[0, 0, 0]) - 40000 * 255 // 65535) <= 1


def test_rows_have_hashes_and_stable_ids(corpus, ingested, tmp_path):
    _, rows, _ = ingested
    for r in rows:
        assert len(r["sha256"]) == 64 and len(r["id"]) == 16 and r["bytes"] > 0
    assert len({r["id"] for r in rows}) == len(rows)
    m2 = run_ingest([corpus["folder"], corpus["tar"], corpus["broken_tar"], corpus["list"]], tmp_path / "again",
                    workers=0)
    assert pq.read_table(tmp_path / "again" / "manifest.parquet").to_pylist() == rows
    assert (tmp_path / "again" / "_SUCCESS").is_file() and m2["digest"]


def test_csv_list_without_header(tmp_path):
    (tmp_path / "a.png").write_bytes(_enc(_img(seed=20), "PNG"))
    (tmp_path / "list.csv").write_text("a.png\nb.png\n")
    m = run_ingest([tmp_path / "list.csv"], tmp_path / "out", workers=0)
    assert m["counts"]["images"] == 1 and m["quarantine_reasons"] == {"missing-file": 1}


def test_missing_source_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        run_ingest([tmp_path / "nope"], tmp_path / "out")
