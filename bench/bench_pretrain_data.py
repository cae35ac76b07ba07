"""Bench: how fast the trainer's batch stream makes DINOv2 batches, inline and with worker processes.

    python3 -m bench.bench_pretrain_data [--batch 32] [--batches 12] [--workers 0 1] [--images 256]

A batch is what `lvdflow pretrain` feeds a ViT-L/14 run: `batch` photo-like 500x375 JPEGs (bench_embed's
synthetic pool), decoded and cut into 2 global crops at 224 px and 8 local crops at 98 px with the paper's
colour jitter, blur and solarisation, plus iBOT masks, collated. The stream hands out encoded bytes, as
the shard reader does in training. Reports images/s of the steady batches (after the first, which includes
the workers' start) for each worker count; images/s per worker core says how many workers a GPU needs
(bench_pretrain_gpu's ViT-L/14 step consumes ~145 images/s on one H100). Writes
bench/results/pretrain_data.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_embed import make_pool  # noqa: E402
from bench.common import write_result  # noqa: E402
from pretrain.config import TrainConfig  # noqa: E402
from pretrain.data import BatchStream  # noqa: E402
from pretrain.train import build_augmentation  # noqa: E402


class BytesStream:
    """The encoded images in a fixed order, resumable like the shard stream (position = samples drawn)."""

    def __init__(self, blobs: list[bytes]):
        self.blobs, self.pos = blobs, 0

    def __iter__(self):
        while True:
            yield self.blobs[self.pos % len(self.blobs)]
            self.pos += 1

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def measure(blobs: list[bytes], workers: int, batch: int, batches: int) -> dict:
    cfg = TrainConfig(arch="vit_large", patch_size=14, global_crops_size=224, local_crops_size=98,
                      local_crops_number=8, batch_size_per_rank=batch).validate()
    aug = build_augmentation(cfg)
    stream = BatchStream(BytesStream(blobs), batch_size=batch, seed=0, rank=0, workers=workers)
    try:
        t0 = time.perf_counter()
        stream.next_batch(0, aug, cfg.patch_size)
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        for it in range(1, batches):
            out = stream.next_batch(it, aug, cfg.patch_size)
        steady = time.perf_counter() - t1
    finally:
        stream.close()
    rate = (batches - 1) * batch / steady
    return {"workers": workers, "batch": batch, "first_batch_s": round(first, 2), "steady_batches": batches - 1,
            "steady_images_per_s": round(rate, 1), "images_per_s_per_process": round(rate / max(workers, 1), 1),
            "local_crops_shape": list(out["local_crops"].shape)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--images", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        make_pool(Path(tmp), args.images)
        blobs = [p.read_bytes() for p in sorted(Path(tmp).iterdir())]
    rows = []
    for w in args.workers:
        rows.append(measure(blobs, w, args.batch, args.batches))
        print(rows[-1], flush=True)
    write_result("pretrain_data", {"command": "python3 -m bench.bench_pretrain_data " + " ".join(sys.argv[1:]),
                                   "crops": "2x224 + 8x98, 500x375 JPEG sources", "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
