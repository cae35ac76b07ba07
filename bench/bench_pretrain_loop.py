"""Bench: the real trainer's throughput, shards to optimizer step (what `lvdflow pretrain` runs), not a model step.

    python3 -m bench.bench_pretrain_loop [--arch vit_large] [--iters 30] [--workers -1 0] [--images 2048]

bench_pretrain_gpu times the model step on synthetic tensors; this times `pretrain.train.train` itself on
WebDataset shards of photo-like 500x375 JPEGs (bench_embed's pool, ingested and sharded by the curation
stages): shard reading, decoding and multi-crop in the batch workers, host-to-device copies, the step, the
late metric reads, the EMA. The recipe is bench_pretrain_gpu's (ViT-L/14: vitl14's heads and Sinkhorn-Knopp,
batch 32; ViT-S/14: batch 64), with `compile` as asked. Steady images/s are taken from the metrics log
(records after the first `--skip` iterations). `--workers` lists the data_workers settings to compare
(-1: automatic). On CPU use a small `--arch vit_tiny --batch 8 --iters 6` to check the path.
Writes bench/results/pretrain_loop[_DEVICE].json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_embed import make_pool  # noqa: E402
from bench.bench_pretrain_gpu import recipe_config  # noqa: E402
from bench.common import write_result  # noqa: E402


def make_shards(work: Path, n: int) -> Path:
    from curation.ingest import run_ingest
    from shards.writer import run_shard

    make_pool(work / "pool", n)
    run_ingest([work / "pool"], work / "ingest")
    run_shard(work / "ingest", work / "shards", max_count=256, workers=4)
    return work / "shards"


def run_once(shards: Path, out: Path, arch: str, batch: int, iters: int, workers: int, compile_: bool,
             skip: int) -> dict:
    from pretrain.data import data_workers
    from pretrain.metrics_log import read_metrics
    from pretrain.train import train

    cfg = recipe_config(arch, **({"batch_size_per_rank": batch} if batch else {}),
                        total_iters=iters, warmup_iters=max(1, iters // 4), warmup_teacher_temp_iters=max(1, iters // 4),
                        freeze_last_layer_iters=1, checkpoint_every=10**9, log_every=1, data_workers=workers,
                        compile=compile_)
    t = time.perf_counter()
    summary = train(cfg, out, shards=shards)
    wall = time.perf_counter() - t
    records = [r for r in read_metrics(out / "metrics.jsonl") if "s_per_iter" in r and r["iteration"] >= skip]
    s_per_iter = sum(r["s_per_iter"] for r in records) / max(len(records), 1)
    row = {"arch": arch, "batch": cfg.batch_size_per_rank, "data_workers": workers,
           "workers_used": data_workers(workers), "compile": compile_, "iters": iters,
           "steady_iters": len(records), "steady_s_per_iter": round(s_per_iter, 4),
           "steady_images_per_s": round(cfg.batch_size_per_rank / s_per_iter, 1) if records else None,
           "wall_s": round(wall, 1), "last_loss": summary["last"].get("total_loss")}
    if torch.cuda.is_available():
        row["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="vit_large")
    ap.add_argument("--batch", type=int, default=0, help="0: the recipe's")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--skip", type=int, default=5, help="iterations left out of the steady rate (start, compile)")
    ap.add_argument("--workers", type=int, nargs="+", default=[-1, 0])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp), args.images)
        for w in args.workers:
            rows.append(run_once(shards, Path(tmp) / f"run_w{w}", args.arch, args.batch, args.iters, w, args.compile,
                                 args.skip))
            print(json.dumps(rows[-1]), flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    write_result("pretrain_loop" if device == "cpu" else f"pretrain_loop_{device}",
                 {"command": "python3 -m bench.bench_pretrain_loop " + " ".join(sys.argv[1:]),
                  "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
