"""GPU profile of the embedding forward (ViT-H/14 @224): kernel-time breakdown and attention/precision/
compile-mode variants, to see where the time goes before changing the stage.

    python3 -m bench.profile_embed_gpu [--batch 256] [--autotune]

Prints one JSON line per variant (images/s, TFLOP/s, fraction of the 989 TFLOP/s dense bf16 peak) and the
top kernels of the stage's own configuration (compiled blocks, bf16 autocast, default SDPA backend).
Not part of `make bench` (its name does not start with bench_): a tool for a lent GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.bench_embed import H100_BF16_DENSE_PEAK, time_fn
from curation.embed import embed_batch
from pretrain.models import build_vit, vit_forward_flops

BACKENDS = {
    "default": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def variant(batch: int, backend: str, bf16_weights: bool, mode: str | None, reps: int, profile: bool = False) -> dict:
    torch._dynamo.reset()  # SDPA's kernel is chosen when the graph is traced
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build_vit("vit_huge", patch_size=14, img_size=224).eval()
    if bf16_weights:
        model = model.to(torch.bfloat16)
    if mode != "eager":
        for blk in model.blocks:
            blk.compile(mode=mode)
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16 if bf16_weights else torch.float32)
    ctx = sdpa_kernel([BACKENDS[backend]]) if BACKENDS[backend] else contextlib.nullcontext()
    t0 = time.perf_counter()
    with torch.inference_mode(), ctx:
        times = time_fn(lambda: embed_batch(model, x), reps, 3, True)
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as prof

            with prof(activities=[ProfilerActivity.CUDA]) as p:
                embed_batch(model, x)
                torch.cuda.synchronize()
            print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=70))
    med = statistics.median(times)
    tflops = vit_forward_flops(model.config, 224) * batch / med / 1e12
    return {"batch": batch, "attention": backend, "bf16_weights": bf16_weights, "compile_mode": mode,
            "images_per_s": batch / med, "tflops": tflops, "mfu_vs_989": tflops * 1e12 / H100_BF16_DENSE_PEAK,
            "wall_s": time.perf_counter() - t0}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--autotune", action="store_true", help="also try compile mode max-autotune-no-cudagraphs")
    args = ap.parse_args()
    runs = [("default", False, "default", True)]
    runs += [(b, w, "default", False) for w in (False, True) for b in ("flash", "cudnn", "efficient")]
    if args.autotune:
        runs += [("default", True, "max-autotune-no-cudagraphs", False)]
    for backend, bf16w, mode, profile in runs:
        try:
            r = variant(args.batch, backend, bf16w, mode, args.reps, profile)
        except Exception as exc:
            r = {"attention": backend, "bf16_weights": bf16w, "compile_mode": mode,
                 "error": f"{type(exc).__name__}: {exc}"[:300]}
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
