"""Bench: how mixed the trainer's batches are, with shards written in input order or in a seeded permutation.

    python3 -m bench.bench_shard_mixing [--folders 10] [--per-folder 1000] [--max-count 10000] [--batch 32]

A pool of `folders` x `per_folder` tiny images, one folder per concept as an ImageFolder layout or a crawl
is (ingest walks folders in order), is ingested and sharded twice: `--keep-order` and the default seeded
permutation. The training reader (`ShardDataset` as `pretrain/train.py` builds it: the default 1,000-sample
shuffle buffer, shards permuted per epoch) then reads one epoch in batches of `batch`; the figure is the mean
number of distinct folders per batch, against the i.i.d. expectation F(1 - (1 - 1/F)^B). Writes
bench/results/shard_mixing.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402
from curation.ingest import run_ingest  # noqa: E402
from shards.reader import ShardDataset  # noqa: E402
from shards.writer import run_shard  # noqa: E402


def make_pool(root: Path, folders: int, per_folder: int) -> None:
    rng = np.random.default_rng(0)
    for f in range(folders):
        d = root / f"concept{f:02d}"
        d.mkdir(parents=True)
        for i in range(per_folder):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(d / f"{i:05d}.png")


def folders_per_batch(shards: Path, folder_of: dict[str, str], batch: int) -> float:
    ds = ShardDataset(shards, seed=0, decode="bytes")
    ds.set_epoch(0)
    keys = [s["key"] for s in ds]
    counts = [len({folder_of[k] for k in keys[i:i + batch]}) for i in range(0, len(keys) - batch + 1, batch)]
    return float(np.mean(counts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folders", type=int, default=10)
    ap.add_argument("--per-folder", type=int, default=1000)
    ap.add_argument("--max-count", type=int, default=10_000, help="samples per shard (production: 10,000)")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_pool(root / "pool", args.folders, args.per_folder)
        run_ingest([root / "pool"], root / "ingest", workers=0)
        manifest = pq.read_table(root / "ingest" / "manifest.parquet", columns=["id", "relpath"]).to_pylist()
        folder_of = {r["id"]: Path(r["relpath"]).parts[0] for r in manifest}
        result = {}
        for name, seed in (("input_order", None), ("seeded_permutation", 0)):
            run_shard(root / "ingest", root / name, max_count=args.max_count, shuffle_seed=seed)
            result[name] = round(folders_per_batch(root / name, folder_of, args.batch), 2)
    f, b = args.folders, args.batch
    write_result("shard_mixing", {
        "command": "python3 -m bench.bench_shard_mixing " + " ".join(sys.argv[1:]),
        "images": f * args.per_folder, "folders": f, "max_count": args.max_count, "batch": b,
        "shuffle_buffer": 1000, "folders_per_batch": result,
        "folders_per_batch_iid": round(f * (1 - (1 - 1 / f) ** b), 2),
    })


if __name__ == "__main__":
    main()
