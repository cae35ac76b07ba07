"""Attention kernels on a lent GPU at the embedding stage's shape (ViT-H/14 @224: 257 tokens, 16 heads of 80).

    python3 -m bench.bench_attention_gpu [--batch 256] [--tokens 257] [--heads 16] [--head-dim 80]

Times, forward only, bf16: SDPA with each backend forced, and xformers' memory_efficient_attention with its
automatic choice and with each forward op it offers (FlashAttention-3 on Hopper when built in). Every kernel's
output is checked against SDPA's math backend. Writes bench/results/attention_gpu.json.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.bench_embed import time_fn
from bench.common import write_result


def _sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2)

    return run


def candidates() -> dict:
    runs = {f"sdpa_{b.name.lower()}": _sdpa(b) for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                                        SDPBackend.EFFICIENT_ATTENTION)}  # fmt: skip
    try:
        from xformers.ops import fmha
    except Exception as exc:  # noqa: BLE001 - any import failure means: not available
        print(f"xformers unavailable: {exc}")
        return runs
    runs["xformers_auto"] = lambda q, k, v: fmha.memory_efficient_attention(q, k, v)
    for name in ("flash3", "flash", "cutlass", "ck"):
        mod = getattr(fmha, name, None)
        if mod is not None and hasattr(mod, "FwOp"):
            runs[f"xformers_{name}"] = lambda q, k, v, op=mod.FwOp: fmha.memory_efficient_attention_forward(
                q, k, v, op=op
            )
    return runs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=257)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=80)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention_gpu: no CUDA device, nothing measured")
        return
    torch.manual_seed(0)
    shape = (args.batch, args.tokens, args.heads, args.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = _sdpa(SDPBackend.MATH)(q.float(), k.float(), v.float())
    flops = 4 * args.batch * args.heads * args.tokens**2 * args.head_dim
    rows = []
    with torch.inference_mode():
        for name, fn in candidates().items():
            try:
                err = (fn(q, k, v).float() - ref).abs().max().item()
                med = statistics.median(time_fn(lambda fn=fn: fn(q, k, v), args.reps, 3, True))
                row = {"kernel": name, "ms": med * 1e3, "tflops": flops / med / 1e12, "max_abs_err_vs_fp32": err}
            except Exception as exc:  # noqa: BLE001 - a kernel that cannot run this shape is a result too
                row = {"kernel": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
            print(row, flush=True)
            rows.append(row)
    write_result("attention_gpu", {"shape_b_n_h_d": list(shape), "gpu": torch.cuda.get_device_name(), "rows": rows})


if __name__ == "__main__":
    main()
