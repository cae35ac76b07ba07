"""Bench: the kNN / linear evaluation's input path, normalising per image or per batch.

    python3 -m bench.bench_eval_transform [--images 2000] [--batch 256]

Per image, `pretrain.evaluate.eval_transform` resizes and centre-crops (the DINO eval transform) and stops at
uint8; `extract_features` then normalises each batch on the model's device (`pretrain.normalise`). Before
2026-12-02 the per-image transform also scaled and normalised (torchvision v2 `ToDtype` + `Normalize`).
Both are timed here on one thread, for the demo's 28 px Fashion-MNIST images at the demo's 28 px evaluation
size and for 500x375 photo-like JPEGs (bench_embed's synthetic pool) at 224 px: transform and collate of
every image, plus the normalisation of every batch, without the model. Writes
bench/results/eval_transform.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from bench.bench_embed import make_pool  # noqa: E402
from bench.common import write_result  # noqa: E402
from pretrain.evaluate import eval_transform  # noqa: E402
from pretrain.normalise import IMAGENET_MEAN, IMAGENET_STD, BatchNormalise  # noqa: E402


def per_image(images: list, size: int, batch: int) -> float:
    """Seconds: the old path, scale and normalise in every image's transform."""
    t = v2.Compose([eval_transform(size), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        torch.stack([t(im) for im in images[i:i + batch]])
    return time.perf_counter() - start


def per_batch(images: list, size: int, batch: int) -> float:
    """Seconds: uint8 per image, one normalisation per batch (what extract_features does)."""
    t, normalise = eval_transform(size), BatchNormalise("cpu")
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        normalise(torch.stack([t(im) for im in images[i:i + batch]]))
    return time.perf_counter() - start


def measure(name: str, images: list, size: int, batch: int) -> dict:
    per_image(images[:batch], size, batch), per_batch(images[:batch], size, batch)  # warm up
    a, b = per_image(images, size, batch), per_batch(images, size, batch)
    return {"set": name, "images": len(images), "eval_size": size,
            "per_image_normalise_ms_per_image": round(a / len(images) * 1e3, 3),
            "per_batch_normalise_ms_per_image": round(b / len(images) * 1e3, 3),
            "speedup": round(a / b, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from curation.demo_data import load_fashion_mnist

    x, _ = load_fashion_mnist("test")
    rows = [measure("fashion-mnist 28 px", [Image.fromarray(a).convert("RGB") for a in x[:args.images]], 28,
                    args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        n = max(args.images // 8, args.batch)
        make_pool(Path(tmp), n)
        photos = [Image.open(p).convert("RGB") for p in sorted(Path(tmp).iterdir())]
        rows.append(measure("500x375 JPEG", photos, 224, args.batch))
    write_result("eval_transform", {"command": "python3 -m bench.bench_eval_transform " + " ".join(sys.argv[1:]),
                                    "threads": 1, "batch": args.batch, "rows": rows})


if __name__ == "__main__":
    main()
