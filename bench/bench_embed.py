"""Embedding throughput: model-only FLOP utilisation and end-to-end images/s (decode included).

    .venv/bin/python -m bench.bench_embed                 # CPU: a small ViT (vit_small/14 @224, fp32, 1 thread)
    python3 -m bench.bench_embed --mode gpu               # GPU: ViT-H/14 @224, bf16 (production embedder)

Model-only: random input already on the device, `embed_batch` (the stage's own forward: on CUDA the
options of curation.embed.CUDA_INFERENCE, plus the older bf16-autocast paths for comparison; fp32 on CPU),
median of timed repetitions after warm-up, CUDA-synchronised. FLOPs are the matmul
FLOPs of the forward (pretrain.models.flops, 334.6 GFLOPs per image for ViT-H/14 @224); utilisation is
against the dense bf16 datasheet peak (H100 SXM: 989 TFLOP/s) and against a matmul measured here, and on
CPU against a float32 matmul measured here with the same thread count (best repetition of each).

End-to-end: a synthetic pool of photo-like JPEGs (500x375: a smooth random field plus grain, ~ImageNet's
typical size) goes through `run_ingest`, then `run_embed` with DataLoader decode workers; images/s is taken
over the steady state (after the first two batches: worker start-up, compilation; also without the shard's
padded last batch) and over the whole call (model build, compilation, worker start and shutdown included).
The model is a seeded random init (`allow_random_init`): weights do not change the speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import write_result

H100_BF16_DENSE_PEAK = 989e12


def _photo(args: tuple[Path, int, int, int]) -> None:
    from PIL import Image

    path, seed, w, h = args
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    arr = np.asarray(low, dtype=np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def make_pool(folder: Path, n: int, size: tuple[int, int] = (500, 375), workers: int | None = None) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"{i:07d}.jpg", i, *size) for i in range(n)]
    with ProcessPoolExecutor(workers or os.cpu_count()) as ex:
        list(ex.map(_photo, jobs, chunksize=64))
    return sum(p.stat().st_size for p in folder.iterdir())


def time_fn(fn, reps: int, warmup: int, cuda: bool) -> list[float]:
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return times


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int, best: bool = False) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_fn(lambda: a @ b, reps, 2, device.type == "cuda")
    t = min(times) if best else statistics.median(times)
    return 2 * n**3 / t


def model_only(arch: str, patch: int, img: int, batch: int, device: torch.device, compile: bool, reps: int,
               stage_options: bool = False) -> dict:  # fmt: skip
    """`stage_options` on CUDA: the stage's own inference options (curation.embed.CUDA_INFERENCE);
    otherwise bf16 autocast over float32 weights on CUDA, float32 on CPU."""
    from curation.embed import CUDA_INFERENCE, embed_batch, prepare_for_inference
    from pretrain.models import build_vit, vit_forward_flops

    torch.manual_seed(0)
    with device:  # random init where the model runs (a CPU init of ViT-H's 630M weights takes many seconds)
        model = build_vit(arch, patch_size=patch, img_size=img)
    model = prepare_for_inference(model, device, compile, **(CUDA_INFERENCE if stage_options else {}))
    x = torch.randn(batch, 3, img, img, device=device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        times = time_fn(lambda: embed_batch(model, x), reps, 3, device.type == "cuda")
    med = statistics.median(times)
    flops = vit_forward_flops(model.config, img)
    del model
    return {
        "arch": arch, "patch_size": patch, "img_size": img, "batch_size": batch, "compile": compile,
        "precision": ("stage default: " + ", ".join(k for k, on in CUDA_INFERENCE.items() if on)) if stage_options
                     else ("bf16 autocast" if device.type == "cuda" else "fp32"),
        "gflops_per_image": flops / 1e9, "median_batch_s": med, "min_batch_s": min(times),
        "images_per_s": batch / med, "achieved_tflops": flops * batch / med / 1e12,
        "bench_wall_s_incl_warmup": time.perf_counter() - t0,
    }  # fmt: skip


def steady_rates(marks: list[tuple[float, int]], batch: int) -> dict:
    """Images/s from progress marks (time, images done): from the third batch (after worker start-up and
    compilation) to the last, and to the last full batch (without a shard's padded last batch)."""
    skip = min(2, len(marks) - 2)
    (t_a, d_a), (t_b, d_b) = marks[skip], marks[-1]
    full = [mk for mk in marks[skip:] if mk[1] % batch == 0]
    (t_c, d_c) = full[-1] if len(full) > 1 else (t_b, d_b)
    return {"images_per_s_steady": (d_b - d_a) / (t_b - t_a) if t_b > t_a else None,
            "images_per_s_steady_full_batches": (d_c - d_a) / (t_c - t_a) if t_c > t_a else None}  # fmt: skip


def end_to_end(tmp: Path, n: int, arch: str, patch: int, img: int, batch: int, device: str,
               workers: int | list[int], shard: int) -> dict:  # fmt: skip
    """One pool, ingested once, embedded once per decode-worker count (the first run's figures at the top
    level, every run under "runs")."""
    from curation.embed import run_embed
    from curation.ingest import run_ingest

    t = time.perf_counter()
    pool_bytes = make_pool(tmp / "pool", n)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    run_ingest([tmp / "pool"], tmp / "ingest", workers=None)
    ingest_s = time.perf_counter() - t
    runs = []
    for w in [workers] if isinstance(workers, int) else workers:
        marks: list[tuple[float, int]] = []
        t = time.perf_counter()
        m = run_embed(tmp / "ingest", None, tmp / f"emb{w}", arch=arch, patch_size=patch, img_size=img,
                      allow_random_init=True, batch_size=batch, num_workers=w, device=device, shard_size=shard,
                      progress=lambda done, total: marks.append((time.perf_counter(), done)))  # fmt: skip
        wall = time.perf_counter() - t
        runs.append({"decode_workers": w, "embedded": m["counts"]["embedded"], "embed_wall_s": wall,
                     "images_per_s_whole_call": n / wall, **steady_rates(marks, batch)})  # fmt: skip
        print(json.dumps(runs[-1]), flush=True)
    return {
        "images": n, "mean_jpeg_kb": pool_bytes / n / 1024, "jpeg_size": "500x375", "arch": arch,
        "patch_size": patch, "img_size": img, "batch_size": batch, "shard_size": shard, "device": device,
        "pool_generation_s": gen_s, "ingest_s": ingest_s, **runs[0], "runs": runs,
    }  # fmt: skip


def cpu(args: argparse.Namespace) -> dict[str, Any]:
    # One compute thread, as the stage uses next to one decode worker on this 2-core machine; on a shared,
    # loaded machine a single thread also suffers least from waiting for descheduled siblings. Peak and
    # model are both taken as the best repetition, so that load spikes hit neither.
    dev = torch.device("cpu")
    torch.set_num_threads(args.cpu_threads)
    peak = matmul_peak(dev, torch.float32, 2048, 7, best=True)
    res = {"mode": "cpu", "torch_threads": torch.get_num_threads(), "fp32_matmul_2048_gflops_best": peak / 1e9}
    mo = model_only(args.arch, args.patch, args.img, args.batch, dev, False, args.reps)
    best_tflops = mo["gflops_per_image"] * mo["batch_size"] / mo["min_batch_s"] / 1e3
    mo["mfu_best_vs_best_fp32_matmul"] = best_tflops * 1e12 / peak
    res["model_only"] = mo
    with tempfile.TemporaryDirectory() as tmp:
        res["end_to_end"] = end_to_end(Path(tmp), args.images, args.arch, args.patch, args.img, args.batch,
                                       "cpu", args.workers if args.workers is not None else [1], 64)  # fmt: skip
    return res


def gpu(args: argparse.Namespace) -> dict[str, Any]:
    dev = torch.device("cuda")
    res: dict[str, Any] = {"mode": "gpu", "gpu": torch.cuda.get_device_name(0)}
    peak = matmul_peak(dev, torch.bfloat16, 8192, 10)
    res["bf16_matmul_8192_tflops"] = peak / 1e12
    res["model_only"] = []

    def save() -> None:  # partial results survive a time limit
        if args.partial_json:
            Path(args.partial_json).write_text(json.dumps(res, indent=2, default=str))

    # (compile, stage options): the stage's own compiled bf16 path first, then the older autocast ones
    # (compiled and eager) for comparison; the end-to-end run goes after the first two, so that it is
    # measured even if time runs short.
    kinds = {"stage": (True, True), "autocast-compiled": (True, False), "autocast-eager": (False, False)}
    variants = [(*kinds[k], b) for k in kinds if k in args.gpu_variants for b in args.gpu_batches]
    if args.images and len(variants) < 2:
        variants += [None] * (2 - len(variants))  # the end-to-end run goes at index 2
    for i, v in enumerate(variants + [None]):
        if i == 2 and args.images:
            with tempfile.TemporaryDirectory() as tmp:
                workers = args.workers if args.workers is not None else [os.cpu_count() or 1]
                res["end_to_end"] = end_to_end(Path(tmp), args.images, args.arch, args.patch, args.img, args.batch,
                                               "cuda", workers, args.shard_size)  # fmt: skip
            print(json.dumps(res["end_to_end"]), flush=True)
            save()
        if v is None:
            continue
        compile, stage, batch = v
        try:
            mo = model_only(args.arch, args.patch, args.img, batch, dev, compile, args.reps, stage)
            mo["mfu_vs_989_dense_bf16"] = mo["achieved_tflops"] * 1e12 / H100_BF16_DENSE_PEAK
            mo["fraction_of_measured_matmul"] = mo["achieved_tflops"] * 1e12 / peak
        except Exception as exc:  # keep the other variants' numbers
            mo = {"batch_size": batch, "compile": compile, "stage_options": stage,
                  "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(mo), flush=True)
        res["model_only"].append(mo)
        save()
        torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("auto", "cpu", "gpu"), default="auto")
    ap.add_argument("--arch", default=None, help="default: vit_small on CPU, vit_huge on GPU")
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--batch", type=int, default=None, help="end-to-end batch (default: 16 CPU, 256 GPU)")
    ap.add_argument("--gpu-batches", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--gpu-variants", nargs="+", choices=("stage", "autocast-compiled", "autocast-eager"),
                    default=["stage", "autocast-compiled", "autocast-eager"], help="model-only variants on GPU")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--images", type=int, default=None, help="end-to-end pool size (default: 96 CPU, 30000 GPU)")
    ap.add_argument("--workers", type=int, nargs="+", default=None,
                    help="decode worker counts for end-to-end runs (default: all CPUs on GPU, 1 on CPU)")
    ap.add_argument("--shard-size", type=int, default=50_000, help="GPU end-to-end shard size (the stage's default)")
    ap.add_argument("--cpu-threads", type=int, default=1, help="torch threads for the CPU model-only figures")
    ap.add_argument("--partial-json", default=None, help="also dump partial GPU results here after each step")
    ap.add_argument("--name", default=None, help="result name (default: embed_cpu / embed_gpu)")
    args = ap.parse_args()
    mode = args.mode if args.mode != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    on_gpu = mode == "gpu"
    args.arch = args.arch or ("vit_huge" if on_gpu else "vit_small")
    args.batch = args.batch or (256 if on_gpu else 16)
    args.reps = args.reps or (20 if on_gpu else 3)
    args.images = args.images if args.images is not None else (30_000 if on_gpu else 96)
    t = time.perf_counter()
    load_before = os.getloadavg()  # other processes on the machine skew CPU figures: record how busy it was
    res = gpu(args) if on_gpu else cpu(args)
    res["loadavg_1_5_15_before_after"] = [load_before, os.getloadavg()]
    res["command_args"] = vars(args)
    res["bench_wall_s"] = time.perf_counter() - t
    write_result(args.name or f"embed_{mode}", res)


if __name__ == "__main__":
    main()
