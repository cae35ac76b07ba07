"""Demo data from real images shipped by Debian packages.

    dataset-fashion-mnist  /usr/share/datasets/fashion-mnist   the in-domain images (70k, 10 classes)
    openclipart-png        /usr/share/openclipart/png          out-of-domain clipart
    crawl-tiles-data       /usr/share/crawl                    out-of-domain game tiles (cut from sheets)

Layout written under `out`:
    pool/<xx>/img_<n>.<ext>     uncurated pool: Fashion-MNIST train images, clipart, tiles, planted copies
                                of pool images (edited), images that need care at decode time, broken files
    queries/q_<n>.png           curated queries: Fashion-MNIST train images that are not in the pool
    eval/train/<class>/*.png    labelled ImageFolder sets for kNN / linear evaluation (train split images
    eval/test/<class>/*.png     not used elsewhere; test split from Fashion-MNIST's own test set)
    ground_truth.parquet        one row per pool file: kind, label, copy_of, edit, expected quarantine reason
Everything is drawn with a fixed seed, so the same size gives the same files.
"""

from __future__ import annotations

import gzip
import io
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from lvdflow.errors import UserError
from lvdflow.stage import dir_digest, publish, work_dir

FMNIST_DIR = Path(os.environ.get("LVDFLOW_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
CLIPART_DIR = Path(os.environ.get("LVDFLOW_CLIPART_DIR", "/usr/share/openclipart/png"))
TILES_DIR = Path(os.environ.get("LVDFLOW_TILES_DIR", "/usr/share/crawl"))
DEBIAN_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist", "clipart": "openclipart-png", "tiles": "crawl-tiles-data"}

CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]


@dataclass(frozen=True)
class DemoSize:
    pool_fmnist: int
    clipart: int
    tiles: int
    copies: int
    queries: int
    eval_train_per_class: int
    eval_test_per_class: int


SIZES = {
    # small: the whole local DAG on a 2-core CPU in 9 (quiet) to ~25 (shared) minutes (README). 3000 kNN
    # queries, not 500: the kNN difference of two models on 500 shared queries has ~2 points of sampling
    # noise, too much for a +5 bar.
    "small": DemoSize(pool_fmnist=2000, clipart=300, tiles=300, copies=200, queries=300,
                      eval_train_per_class=300, eval_test_per_class=300),
    # medium: for a GPU machine.
    "medium": DemoSize(pool_fmnist=30000, clipart=4000, tiles=4000, copies=3000, queries=5000,
                       eval_train_per_class=1000, eval_test_per_class=1000),
    # tiny: tests only.
    "tiny": DemoSize(pool_fmnist=60, clipart=10, tiles=10, copies=12, queries=20,
                     eval_train_per_class=4, eval_test_per_class=2),
}

EDITS = ["resize", "jpeg", "crop", "flip", "jitter", "grayscale", "text", "border", "rotate", "blur"]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    img_path = FMNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    lbl_path = FMNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_path.is_file():
        raise UserError(f"Fashion-MNIST not found at {FMNIST_DIR}: install Debian's "
                        f"'{DEBIAN_PACKAGES['fashion-mnist']}' package (make setup does)")
    return _read_idx(img_path), _read_idx(lbl_path)


def _clipart_files() -> list[Path]:
    files = sorted(CLIPART_DIR.rglob("*.png")) if CLIPART_DIR.is_dir() else []
    if not files:
        raise UserError(f"no clipart under {CLIPART_DIR}: install Debian's '{DEBIAN_PACKAGES['clipart']}' package")
    return files


def _tile_sheets() -> list[Path]:
    sheets = sorted(TILES_DIR.rglob("*.png")) if TILES_DIR.is_dir() else []
    if not sheets:
        raise UserError(f"no tiles under {TILES_DIR}: install Debian's '{DEBIAN_PACKAGES['tiles']}' package")
    return sheets


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _load_clipart(path: Path, max_side: int = 160) -> Image.Image:
    img = Image.open(path)
    img.load()
    img.thumbnail((max_side, max_side))  # keep the demo light; the drawings stay real
    return img


def _cut_tiles(sheets: list[Path], n: int, rng: random.Random) -> list[Image.Image]:
    """32x32 tiles cut from the sheets, skipping empty (transparent or flat) cells."""
    cells: list[tuple[Path, int, int]] = []
    for sheet in sheets:
        with Image.open(sheet) as im:
            w, h = im.size
        cells.extend((sheet, x, y) for y in range(0, h - 31, 32) for x in range(0, w - 31, 32))
    rng.shuffle(cells)
    out: list[Image.Image] = []
    opened: dict[Path, Image.Image] = {}
    for sheet, x, y in cells:
        if len(out) >= n:
            break
        im = opened.setdefault(sheet, Image.open(sheet).convert("RGBA"))
        tile = im.crop((x, y, x + 32, y + 32))
        arr = np.asarray(tile)
        if arr[..., 3].mean() < 40 or arr[..., :3].std() < 12:
            continue
        out.append(tile)
    return out


def apply_edit(img: Image.Image, edit: str, rng: random.Random) -> Image.Image:
    """One copy-style edit, as the LVD dedup step has to see through."""
    img = img.convert("RGB")
    w, h = img.size
    if edit == "resize":
        s = rng.uniform(0.5, 0.8) if min(w, h) > 40 else rng.uniform(1.5, 2.5)
        return img.resize((max(8, round(w * s)), max(8, round(h * s))), Image.BICUBIC)
    if edit == "jpeg":
        return Image.open(io.BytesIO(_jpeg(img, rng.randint(20, 60)))).convert("RGB")
    if edit == "crop":
        keep = rng.uniform(0.75, 0.92)
        cw, ch = max(8, round(w * keep)), max(8, round(h * keep))
        x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
        return img.crop((x0, y0, x0 + cw, y0 + ch))
    if edit == "flip":
        return ImageOps.mirror(img)
    if edit == "jitter":
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
        img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.7, 1.3))
        return ImageEnhance.Color(img).enhance(rng.uniform(0.5, 1.5))
    if edit == "grayscale":
        return ImageOps.grayscale(img).convert("RGB")
    if edit == "text":
        draw = ImageDraw.Draw(img)
        draw.text((rng.randint(0, max(0, w // 3)), rng.randint(0, max(0, h // 2))), "copy", fill=(255, 0, 0))
        return img
    if edit == "border":
        b = max(2, min(w, h) // 10)
        return ImageOps.expand(img, border=b, fill=tuple(rng.randint(0, 255) for _ in range(3)))
    if edit == "rotate":
        return img.rotate(rng.uniform(-10, 10), resample=Image.BICUBIC, fillcolor=(255, 255, 255))
    if edit == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.6, 1.5)))
    raise ValueError(f"unknown edit {edit}")


def _broken_files(rng: random.Random, sample: Image.Image) -> list[tuple[str, bytes, str]]:
    """(extension, bytes, the quarantine reason ingest must give)."""
    good_jpeg = _jpeg(sample.resize((64, 64)), 90)
    good_png = _png(sample.resize((64, 64)))
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, "PNG")  # 144 Mpx that compress to a few kB
    return [
        (".jpg", b"", "zero-byte"),
        (".jpg", good_jpeg[: len(good_jpeg) // 2], "truncated"),
        (".png", good_png[: len(good_png) // 2], "truncated"),
        (".jpg", b"<html><body>404 Not Found</body></html>\n", "not-an-image"),
        (".png", bytes(rng.getrandbits(8) for _ in range(2048)), "not-an-image"),
        (".png", bomb.getvalue(), "decompression-bomb"),
        (".png", _png(sample.resize((8, 8))), "too-small"),
    ]


def _needs_care(img: Image.Image) -> list[tuple[str, bytes, str]]:
    """Good images in awkward encodings: ingest must keep and normalise them. (ext, bytes, note)."""
    rgb = img.convert("RGB").resize((56, 56))
    out = []
    buf = io.BytesIO()
    rgb.convert("CMYK").save(buf, "JPEG", quality=90)
    out.append((".jpg", buf.getvalue(), "cmyk"))
    out.append((".png", _png(rgb.convert("P", palette=Image.ADAPTIVE)), "palette"))
    out.append((".png", _png(rgb.convert("LA")), "la"))
    out.append((".png", _png(Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257)), "16-bit"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    buf = io.BytesIO()
    rgb.rotate(90, expand=True).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    out.append((".jpg", buf.getvalue(), "exif-orientation"))
    buf = io.BytesIO()
    rgb.save(buf, "GIF", save_all=True, append_images=[ImageOps.mirror(rgb)], duration=100, loop=0)
    out.append((".gif", buf.getvalue(), "animated"))
    return out


def build_demo_data(out: str | os.PathLike, size: str = "small", seed: int = 0) -> dict[str, Any]:
    if size not in SIZES:
        raise UserError(f"unknown size {size!r}: choose one of {', '.join(SIZES)}")
    cfg = SIZES[size]
    rng = random.Random(seed)
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    clipart_files = _clipart_files()
    sheets = _tile_sheets()
    out = Path(out)
    work = work_dir(out, fresh=True)

    # Disjoint draws from the train split: pool, queries, eval-train.
    order = list(range(len(train_x)))
    rng.shuffle(order)
    n_eval_train = cfg.eval_train_per_class * len(CLASSES)
    pool_idx = order[: cfg.pool_fmnist]
    query_idx = order[cfg.pool_fmnist: cfg.pool_fmnist + cfg.queries]
    rest = order[cfg.pool_fmnist + cfg.queries:]
    eval_train_idx = _per_class(rest, train_y, cfg.eval_train_per_class)[:n_eval_train]
    test_order = list(range(len(test_x)))
    rng.shuffle(test_order)
    eval_test_idx = _per_class(test_order, test_y, cfg.eval_test_per_class)

    # Pool entries: (image or raw bytes, ext, ground-truth row)
    entries: list[tuple[Image.Image | bytes, str, dict]] = []
    for i in pool_idx:
        entries.append((Image.fromarray(train_x[i], "L"), ".png",
                        {"kind": "fmnist", "label": CLASSES[train_y[i]], "in_domain": True}))
    n_clip = 0
    for path in rng.sample(clipart_files, len(clipart_files)):
        if n_clip >= cfg.clipart:
            break
        img = _load_clipart(path)
        if min(img.size) < 24:  # banner-shaped drawings would become too small to be useful
            continue
        n_clip += 1
        entries.append((img, ".png", {"kind": "clipart", "origin": str(path.relative_to(CLIPART_DIR))}))
    for tile in _cut_tiles(sheets, cfg.tiles, rng):
        entries.append((tile, ".png", {"kind": "tile"}))
    for j, (ext, data, note) in enumerate(_needs_care(Image.fromarray(train_x[pool_idx[0]], "L"))):
        entries.append((data, ext, {"kind": "fmnist", "label": CLASSES[train_y[pool_idx[0]]], "in_domain": True,
                                    "care": note}))

    # Names first (shuffled, so nothing about a file's kind shows in its name), then planted copies.
    names = list(range(len(entries) + cfg.copies + 16))
    rng.shuffle(names)
    rows: list[dict] = []
    originals: list[tuple[str, Image.Image]] = []
    for k, (obj, ext, gt) in enumerate(entries):
        rel = _pool_name(names[k], ext)
        _write(work / "pool" / rel, obj if isinstance(obj, bytes) else _png(obj))
        rows.append({"relpath": rel, **gt})
        if not isinstance(obj, bytes):
            originals.append((rel, obj))
    k = len(entries)
    for _ in range(cfg.copies):
        src_rel, src = rng.choice(originals)
        edits = rng.sample(EDITS, rng.choice([1, 1, 2]))
        img = src
        for e in edits:
            img = apply_edit(img, e, rng)
        ext = ".jpg" if "jpeg" in edits or rng.random() < 0.3 else ".png"
        data = _jpeg(img, 85) if ext == ".jpg" else _png(img)
        rel = _pool_name(names[k], ext)
        k += 1
        _write(work / "pool" / rel, data)
        src_row = next(r for r in rows if r["relpath"] == src_rel)
        rows.append({"relpath": rel, "kind": "copy", "copy_of": src_rel, "edit": "+".join(edits),
                     "label": src_row.get("label"), "in_domain": src_row.get("in_domain", False)})
    for ext, data, reason in _broken_files(rng, Image.fromarray(train_x[pool_idx[1]], "L")):
        rel = _pool_name(names[k], ext)
        k += 1
        _write(work / "pool" / rel, data)
        rows.append({"relpath": rel, "kind": "broken", "expected_reason": reason})

    for n, i in enumerate(query_idx):
        _write(work / "queries" / f"q_{n:05d}.png", _png(Image.fromarray(train_x[i], "L")))
    for split, idx, xs, ys in (("train", eval_train_idx, train_x, train_y), ("test", eval_test_idx, test_x, test_y)):
        for i in idx:
            _write(work / "eval" / split / CLASSES[ys[i]] / f"{split}_{i:05d}.png", _png(Image.fromarray(xs[i], "L")))

    cols = ["relpath", "kind", "label", "in_domain", "copy_of", "edit", "care", "origin", "expected_reason"]
    table = pa.table({c: [r.get(c) for r in rows] for c in cols})
    table = table.set_column(3, "in_domain", pa.array([bool(r.get("in_domain")) for r in rows]))
    pq.write_table(table, work / "ground_truth.parquet")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    manifest = {
        "stage": "demo-data",
        "params": {"size": size, "seed": seed},
        "counts": {"pool": len(rows), **{f"pool_{k}": v for k, v in sorted(counts.items())},
                   "queries": len(query_idx), "eval_train": len(eval_train_idx), "eval_test": len(eval_test_idx)},
        "outputs": {"pool": "pool", "queries": "queries", "eval_train": "eval/train", "eval_test": "eval/test",
                    "ground_truth": "ground_truth.parquet"},
        "digest": dir_digest(work),
    }
    return publish(work, out, manifest)


def _per_class(order: list[int], labels: np.ndarray, per_class: int) -> list[int]:
    taken: dict[int, int] = {}
    out = []
    for i in order:
        c = int(labels[i])
        if taken.get(c, 0) < per_class:
            taken[c] = taken.get(c, 0) + 1
            out.append(i)
    return out


def _pool_name(n: int, ext: str) -> str:
    return f"{n % 97:02x}/img_{n:06d}{ext}"


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
