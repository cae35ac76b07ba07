"""Bench: the demo pretraining profile on this CPU, and its kNN top-1 against the same ViT at random init.

    .venv/bin/python bench/bench_pretrain.py [--work runs/bench_pretrain] [--set total_iters=300 ...]

Builds (or reuses) the small demo data, ingests its pool and writes WebDataset shards from it, then runs
the `pretrain` stage (`run_pretrain`, what `lvdflow pretrain --config demo` runs) with kNN evaluation on
the demo's Fashion-MNIST eval split (eval/train as the kNN memory, eval/test as queries). Writes
bench/results/pretrain_demo.json: wall time, iterations, images seen, kNN top-1 (k=10, 20) of the trained
teacher and of the random-init baseline, and the machine's load (the 2-core box is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _override(text: str):
    k, v = text.split("=", 1)
    try:
        return k, json.loads(v)
    except ValueError:
        return k, v


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_pretrain"))
    ap.add_argument("--config", default="demo")
    ap.add_argument("--set", dest="overrides", action="append", type=_override, default=[])
    ap.add_argument("--result", default=str(ROOT / "bench" / "results" / "pretrain_demo.json"))
    ap.add_argument("--shards", help="use these shards (skip building demo data, ingest and sharding)")
    ap.add_argument("--eval-train", help="with --shards: ImageFolder kNN memory")
    ap.add_argument("--eval-test", help="with --shards: ImageFolder kNN queries")
    args = ap.parse_args()

    from pretrain.run_pretrain import run_pretrain

    work = Path(args.work)
    demo, ingest, shards, out = work / "demo", work / "ingest", work / "shards", work / "pretrain"
    t = time.perf_counter()
    if args.shards:
        shards, eval_train, eval_test = Path(args.shards), Path(args.eval_train), Path(args.eval_test)
    else:
        from curation.demo_data import build_demo_data
        from curation.ingest import run_ingest
        from lvdflow.stage import is_complete, read_manifest
        from shards.writer import run_shard

        dm = read_manifest(demo) if is_complete(demo) else build_demo_data(demo, "small")
        if not is_complete(ingest):
            run_ingest([demo / dm["outputs"]["pool"]], ingest, workers=0)
        if not is_complete(shards):
            run_shard(ingest, shards, max_count=500)
        eval_train, eval_test = demo / dm["outputs"]["eval_train"], demo / dm["outputs"]["eval_test"]
    prep_s = time.perf_counter() - t
    for p in (out, Path(str(out) + ".partial")):
        if p.exists():
            shutil.rmtree(p)  # a fresh training run every time
    overrides = dict(args.overrides)
    load0 = os.getloadavg()
    t = time.perf_counter()
    m = run_pretrain(shards, out, config=args.config, overrides=overrides, eval_train=eval_train, eval_test=eval_test)
    wall = time.perf_counter() - t
    knn, base = m["knn"], m["knn_random_init"]
    result = {
        "bench": "pretrain_demo",
        "command": "bench/bench_pretrain.py " + " ".join(sys.argv[1:]),
        "config": args.config, "overrides": overrides,
        "train_wall_s": round(wall, 1), "data_prep_s": round(prep_s, 1),
        "iterations": m["counts"]["iterations"], "images_seen": m["counts"]["images_seen"],
        "knn_top1": knn, "knn_top1_random_init": base,
        "knn_gain_points": {k: round(knn[k] - base[k], 2) for k in knn},
        "bar_gain_5_points": all(knn[k] - base[k] >= 5 for k in knn),
        "final": m["final"],
        "machine": {"cpus": os.cpu_count(), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
                    "python": platform.python_version(), "device": _device()},
        "run_dir": str(out),
    }
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
