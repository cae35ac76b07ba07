"""Bench: the DINOv2 losses' passes over the (rows, K) logits, eager against compiled (`compile=True`).

    python3 -m bench.bench_loss_kernels [--rows 2458] [--prototypes 131072] [--reps 3] [--device cuda]

One iBOT step at ViT-L/14's recipe: teacher targets from bf16 logits of `rows` masked patch tokens (softmax
centering with the centre's EMA, or Sinkhorn-Knopp, 3 iterations), then the student's weighted cross-entropy,
forward and backward into its bf16 logits. 2,458 rows is the expected masked count of a batch of 32 (64
global crops, half masked at ratios 0.1-0.5 of 256 patches). The heads' GEMMs are left out: only the
losses' own passes are timed. Writes bench/results/loss_kernels[_DEVICE].json: seconds per step (median of
`reps` after a warm-up) and, on CUDA, peak memory above the inputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402
from pretrain.losses import IBOTPatchLoss  # noqa: E402


def one_step(loss: IBOTPatchLoss, centering: str, teacher_logits, student_logits, weights) -> torch.Tensor:
    if centering == "centering":
        targets = loss.softmax_center_teacher(teacher_logits, 0.07, update_center=True)
    else:
        targets = loss.sinkhorn_knopp_teacher(teacher_logits, 0.07)
    value = loss.forward_masked(student_logits, targets, weights, n_images=64)
    value.backward()
    return value


def measure(centering: str, compiled: bool, rows: int, k: int, reps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    teacher_logits = torch.randn(rows, k, device=device).to(torch.bfloat16)
    student_logits = torch.randn(rows, k, device=device).to(torch.bfloat16).requires_grad_()
    weights = torch.rand(rows, device=device)
    loss = IBOTPatchLoss(k).to(device)
    if compiled:
        loss.compile_math()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t = time.perf_counter()
    value = one_step(loss, centering, teacher_logits, student_logits, weights)  # warm-up (and compile)
    sync()
    first = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        student_logits.grad = None
        sync()
        t = time.perf_counter()
        value = one_step(loss, centering, teacher_logits, student_logits, weights)
        sync()
        times.append(time.perf_counter() - t)
    row = {"centering": centering, "compiled": compiled, "rows": rows, "prototypes": k,
           "s_per_step": round(statistics.median(times), 4), "first_call_s": round(first, 2),
           "loss": round(float(value.detach()), 5),
           "grad_abs_sum": round(float(student_logits.grad.float().abs().sum()), 3)}
    if device.type == "cuda":
        row["peak_extra_GiB"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2458)
    ap.add_argument("--prototypes", type=int, default=131072)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    for centering in ("centering", "sinkhorn_knopp"):
        for compiled in (False, True):
            rows.append(measure(centering, compiled, args.rows, args.prototypes, args.reps, device))
            print(rows[-1], flush=True)
    speedups = {c: round(next(r["s_per_step"] for r in rows if r["centering"] == c and not r["compiled"])
                         / next(r["s_per_step"] for r in rows if r["centering"] == c and r["compiled"]), 2)
                for c in ("centering", "sinkhorn_knopp")}
    name = "loss_kernels" if device.type == "cpu" else f"loss_kernels_{device.type}"
    write_result(name, {"command": "python3 -m bench.bench_loss_kernels " + " ".join(sys.argv[1:]),
                        "device": str(device), "rows": rows, "speedup_compiled": speedups})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
