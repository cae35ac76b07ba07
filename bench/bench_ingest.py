"""Ingest throughput on the demo pool: lvdflow's parallel ingest vs a plain single-process PIL loop.

    .venv/bin/python -m bench.bench_ingest [--size small] [--repeat 3]

The baseline opens and fully decodes each file with PIL in one process (what a hand-written script does);
ingest additionally hashes, normalises and classifies every failure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from bench.common import write_result
from curation.demo_data import CLIPART_DIR, build_demo_data
from curation.ingest import run_ingest


def pil_loop(folder: Path) -> tuple[int, int]:
    ok = bad = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                with Image.open(os.path.join(root, name)) as im:
                    im.convert("RGB").load()
                ok += 1
            except Exception:
                bad += 1
    return ok, bad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--clipart", type=int, default=1500, help="full-size openclipart files to ingest")
    args = ap.parse_args()
    result: dict = {"command": f"python -m bench.bench_ingest --size {args.size} --repeat {args.repeat}"}
    with tempfile.TemporaryDirectory() as tmp:
        demo = build_demo_data(Path(tmp) / "demo", size=args.size)
        result["demo_pool"] = measure(Path(demo["dir"]) / "pool", Path(tmp), args.repeat)
        # Full-size clipart (hundreds of pixels a side): decoding dominates, as in a real web pool.
        clip = Path(tmp) / "clipart"
        clip.mkdir()
        for i, f in enumerate(sorted(CLIPART_DIR.rglob("*.png"))[: args.clipart]):
            shutil.copyfile(f, clip / f"{i:05d}.png")
        result["openclipart_full_size"] = measure(clip, Path(tmp), args.repeat)
    write_result("ingest", result)


def measure(pool: Path, tmp: Path, repeat: int) -> dict:
    n = sum(len(files) for _, _, files in os.walk(pool))
    pil_loop(pool)  # warm the page cache for both contenders
    base, ours = [], {}
    for _ in range(repeat):
        t = time.perf_counter()
        pil_loop(pool)
        base.append(time.perf_counter() - t)
    for workers in (0, os.cpu_count() or 1):
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            m = run_ingest([pool], tmp / "out", workers=workers)
            times.append(time.perf_counter() - t)
        ours[workers] = min(times)
    return {
        "files": n,
        "pil_loop_images_per_s": round(n / min(base), 1),
        "ingest_images_per_s": {f"workers={w}": round(n / s, 1) for w, s in ours.items()},
        "ingest_kept": m["counts"]["images"],
        "ingest_quarantined": m["counts"]["quarantined"],
    }


if __name__ == "__main__":
    main()
