"""GPU profile of the embedding forward (ViT-H/14 @224): variants of the stage's inference options, with
kernel-time breakdowns, and the decode ceiling of the stage's DataLoader.

    python3 -m bench.profile_embed_gpu [--batch 256] [--variants ...] [--loader-images 8000]

Each variant goes through `curation.embed.prepare_for_inference` / `embed_batch` (the stage's own code):
  autocast      bf16 autocast over float32 weights, compiled blocks (the stage's first default)
  bf16          bf16 weights (bf16 residual stream), compiled blocks
  bf16-gelu     bf16 weights + fc1/GELU fused in a cuBLASLt epilogue, compiled blocks
  bf16-gelu-model   the same with the whole forward compiled as one graph
  bf16-gelu-512     bf16-gelu at batch 512
  bf16-gelu-autotune    bf16-gelu with compile mode max-autotune-no-cudagraphs
  bf16-gelu-cdt     bf16-gelu with Inductor's coordinate-descent tuning of its generated kernels
  stage             the stage's CUDA options (+ patch embedding as a GEMM, FFN residual folded into fc2)
  stage-no-fold, stage-no-patch-matmul    the stage's options less one
Prints one JSON line per variant (images/s, TFLOP/s, fraction of the 989 TFLOP/s dense bf16 peak) and,
for the variants named in --profile, the top kernels by CUDA time. With --loader-images N it also times the
stage's DataLoader alone (decode + resize + crop, no model) on N synthetic 500x375 JPEGs, for a few worker
counts: the ceiling for end-to-end images/s.
Not part of `make bench` (its name does not start with bench_): a tool for a lent GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_embed import H100_BF16_DENSE_PEAK, make_pool, time_fn
from curation.embed import CUDA_INFERENCE, embed_batch, prepare_for_inference
from pretrain.models import build_vit, vit_forward_flops

VARIANTS = {
    # name: (batch multiplier, prepare_for_inference keyword arguments)
    "autocast": (1, dict(bf16_weights=False)),
    "bf16": (1, dict(bf16_weights=True)),
    "bf16-gelu": (1, dict(bf16_weights=True, gelu_epilogue=True)),
    "bf16-gelu-model": (1, dict(bf16_weights=True, gelu_epilogue=True, compile_scope="model")),
    "bf16-gelu-512": (2, dict(bf16_weights=True, gelu_epilogue=True)),
    "bf16-gelu-autotune": (1, dict(bf16_weights=True, gelu_epilogue=True, compile_mode="max-autotune-no-cudagraphs")),
    # Inductor's coordinate-descent tuning of its own (LayerNorm, residual) kernels' block sizes
    "bf16-gelu-cdt": (1, dict(bf16_weights=True, gelu_epilogue=True)),
    # The stage's CUDA options (curation.embed.CUDA_INFERENCE), and each of its last two options left out
    "stage": (1, dict(CUDA_INFERENCE)),
    "stage-no-fold": (1, {**CUDA_INFERENCE, "fold_residual": False}),
    "stage-no-patch-matmul": (1, {**CUDA_INFERENCE, "patch_matmul": False}),
}
INDUCTOR_CONFIG = {"bf16-gelu-cdt": {"coordinate_descent_tuning": True}}


def variant(name: str, batch: int, reps: int, profile: bool) -> dict:
    mult, kw = VARIANTS[name]
    batch *= mult
    torch._dynamo.reset()
    import torch._inductor.config as inductor_config

    inductor_config.coordinate_descent_tuning = False
    for key, value in INDUCTOR_CONFIG.get(name, {}).items():
        setattr(inductor_config, key, value)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build_vit("vit_huge", patch_size=14, img_size=224).eval()
    model = prepare_for_inference(model, torch.device("cuda"), True, **kw)
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    t0 = time.perf_counter()
    with torch.inference_mode():
        times = time_fn(lambda: embed_batch(model, x), reps, 3, True)
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as prof

            with prof(activities=[ProfilerActivity.CUDA]) as p:
                embed_batch(model, x)
                torch.cuda.synchronize()
            print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60))
    med = statistics.median(times)
    tflops = vit_forward_flops(model.config, 224) * batch / med / 1e12
    return {"variant": name, "batch": batch, **kw, "images_per_s": batch / med, "tflops": tflops,
            "mfu_vs_989": tflops * 1e12 / H100_BF16_DENSE_PEAK, "spread_min_max_s": [min(times), max(times)],
            "wall_s": time.perf_counter() - t0}  # fmt: skip


def loader_ceiling(n: int, worker_counts: list[int], batch: int) -> list[dict]:
    """Images/s of the stage's DataLoader alone (after its first two batches: worker start-up)."""
    from curation.embed import make_loader
    from curation.ingest import read_manifest_table, run_ingest

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_pool(Path(tmp) / "pool", n)
        run_ingest([Path(tmp) / "pool"], Path(tmp) / "ingest", workers=None)
        table = read_manifest_table(Path(tmp) / "ingest")
        for w in worker_counts:
            loader = make_loader(table, [0], shard_size=table.num_rows, batch_size=batch, num_workers=w,
                                 img_size=224, max_pixels=10**8, resize_on_device=False, pin_memory=True)  # fmt: skip
            seen, t_start = 0, None
            for i, (idx, images, _) in enumerate(loader):
                if i == 2:
                    t_start, seen = time.perf_counter(), 0
                seen += len(idx)
            dt = time.perf_counter() - t_start
            rows.append({"loader_workers": w, "images": seen, "images_per_s": seen / dt})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS)[:5], choices=list(VARIANTS))
    ap.add_argument("--profile", nargs="*", default=["autocast", "bf16-gelu"], help="variants to profile")
    ap.add_argument("--loader-images", type=int, default=0)
    ap.add_argument("--loader-workers", type=int, nargs="+", default=[8, 14, 16])
    ap.add_argument("--json", default=None, help="also write all rows here")
    args = ap.parse_args()
    rows = []
    for name in args.variants:
        try:
            r = variant(name, args.batch, args.reps, name in args.profile)
        except Exception as exc:
            r = {"variant": name, "error": f"{type(exc).__name__}: {exc}"[:400]}
        print(json.dumps(r), flush=True)
        rows.append(r)
        torch.cuda.empty_cache()
    if args.loader_images:
        rows += loader_ceiling(args.loader_images, args.loader_workers, args.batch)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
