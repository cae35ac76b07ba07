"""Bench: DINOv2 training-step throughput on a GPU (bf16 autocast), ViT-S/14 and ViT-L/14, official recipe shapes.

    python3 bench/bench_pretrain_gpu.py [--archs vit_small,vit_large] [--steps 10]

Each step is the full DINOv2 step of pretrain/meta_arch.py: teacher forward on 2 global crops (224 px),
student forward on 2 global + 8 local crops (98 px) with iBOT masks, heads, losses, backward, gradient
clipping, AdamW and the EMA update. Batches are synthetic tensors (augmentation cost excluded: it runs
on CPU workers in a real run). FLOPs per step are counted by torch.utils.flop_counter on one step
(forward + backward + teacher forward) of a separate eager copy of the model, never on the compiled one:
on torch <= 2.11 a frame that Dynamo meets under a dispatch mode such as FlopCounterMode is skipped for
good, so every later call of the compiled blocks runs eagerly (pytorch/pytorch#140909, #190286). Counting
after the timed steps, as this bench did until 2026-11-23, left the timing right but made the profile that
followed show eager blocks. Attention is counted as its plain matmuls (`pytorch_math_attention`), and the
count is of the FLOPs the step executes, after stochastic depth's batch-subset savings; the row also gives
the count without those savings. MFU = FLOPs / step time / dense bf16 peak (989 TFLOP/s for H100 SXM, 989
for H200). Writes bench/results/pretrain_gpu.json.

`--device cpu` (with a small `--archs vit_tiny`) runs the same code without a GPU, to check the path before
spending device time on it (tests/test_bench_pretrain_gpu.py does); its timings mean nothing and MFU is left out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from unittest import mock

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lvdflow.errors import UserError  # noqa: E402
from pretrain.config import TrainConfig, load_config, profile_path  # noqa: E402
from pretrain.layers.drop_path import SUBSET_THRESHOLD  # noqa: E402
from pretrain.masking import MaskingGenerator, collate_crops  # noqa: E402
from pretrain.models import ARCHS  # noqa: E402
from pretrain.param_groups import apply_schedules, param_groups  # noqa: E402
from pretrain.train import build_meta_arch, compile_for_training, shard_with_fsdp2  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

# The crops every recipe trains on: 2 global of 224 px and 8 local of 98 px, patch 14 (DINOv2's).
CROPS = dict(patch_size=14, img_size=224, global_crops_size=224, local_crops_size=98, local_crops_number=8)
# What a recipe takes from its profile: the model, the heads, the losses and the batch per GPU (not schedules).
RECIPE_FIELDS = ("arch", "img_size", "ffn_layer", "layerscale", "drop_path_rate", "drop_path_uniform",
                 "dino_prototypes", "ibot_prototypes", "head_hidden_dim", "head_bottleneck_dim", "head_nlayers",
                 "ibot_separate_head", "ibot_head_bottleneck_dim", "centering", "koleo_weight",
                 "batch_size_per_rank")


def _profile_recipe(name: str) -> dict:
    """A training profile's recipe fields, read from pretrain/configs so the bench measures what it trains
    (the hand-kept copy here missed vitl14's 256-wide iBOT bottleneck and its 518 px position grid)."""
    cfg = load_config(profile_path(name))
    return {k: getattr(cfg, k) for k in RECIPE_FIELDS}


RECIPES = {
    # DINOv2 defaults for ViT-S/14-sized runs; ViT-L/14 is the production profile, vitl14.yaml (SwiGLU, 131k
    # prototypes, separate iBOT head, Sinkhorn-Knopp centering, stochastic depth 0.4, batch 32 per GPU; the
    # ViT-L figures recorded before 2026-11-23 used softmax centering, those before 2026-12-03 a 384-wide iBOT
    # bottleneck and a 224 px position grid).
    "vit_small": dict(arch="vit_small", ffn_layer="mlp", dino_prototypes=65536, ibot_prototypes=65536,
                      ibot_separate_head=False, drop_path_rate=0.1, batch_size_per_rank=64, centering="centering"),
    "vit_large": _profile_recipe("vitl14"),
}


def recipe_config(name: str, **overrides) -> TrainConfig:
    """The training config a bench runs: the crops, then the recipe (a RECIPES key, or any ViT preset with
    ViT-S's heads), then `overrides` (TrainConfig fields)."""
    recipe = RECIPES[name] if name in RECIPES else {**RECIPES["vit_small"], "arch": name}
    return TrainConfig(**{**CROPS, **recipe, **overrides}).validate()


def synthetic_batch(b: int, n_local: int, device) -> dict:
    samples = [{"global_crops": [torch.randn(3, 224, 224) for _ in range(2)],
                "local_crops": [torch.randn(3, 98, 98) for _ in range(n_local)]} for _ in range(b)]
    out = collate_crops(samples, n_tokens=256, mask_generator=MaskingGenerator((16, 16), max_num_patches=128),
                        rng=np.random.default_rng(0))
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


# Kernel name fragments by kind, first match wins (cuBLAS/CUTLASS GEMMs are named after their tile configs).
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma")),
    ("compiled (triton)", ("triton_",)),
    ("optimizer / EMA / clip (foreach)", ("multi_tensor_apply", "foreach", "adam")),
    ("collectives", ("nccl",)),
    ("copies", ("memcpy", "memset", "copy_kernel", "catarraybatchedcopy")),
)


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel, from its name; "eager elementwise / other" when nothing matches (ATen's
    elementwise, reduction, norm and indexing kernels: the memory-bound work that compiling should fuse)."""
    low = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(p in low for p in parts)), "eager elementwise / other")


def profile_steps(step, n: int, rows: int) -> dict:
    """Top kernels by CUDA time over `n` steps, the summed kernel time per step, and how many compiled regions
    ran per step (0 with --compile means the blocks fell back to eager). (The profiler's own CPU overhead
    inflates the wall time of profiled steps, so kernel time / wall is only a lower bound on how busy the
    GPU is.)"""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    events = p.key_averages()
    print(events.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70), flush=True)
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_us = sum(e.self_device_time_total for e in kernels)
    by_kind: dict[str, float] = {}
    for e in kernels:
        kind = kernel_kind(e.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + e.self_device_time_total / 1e3 / n
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:15]
    regions = sum(e.count for e in events if e.key.startswith("Torch-Compiled Region"))
    return {"profiled_steps": n, "profiled_wall_s": round(wall, 4), "kernel_s_per_step": round(kernel_us / 1e6 / n, 4),
            "compiled_regions_per_step": regions / n,
            # Where the GPU's time goes, so one device call says what to attack next (kept in the JSON, as a
            # device call's text output may be cut).
            "kernel_ms_per_step_by_kind": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms_per_step": [[e.key[:90], round(e.self_device_time_total / 1e3 / n, 2), e.count // n]
                                        for e in top]}


def synchronize(dev: torch.device) -> None:
    """Wait for the device's queued work (timings on CUDA are meaningless without it); nothing on CPU."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@contextlib.contextmanager
def pytorch_math_attention():
    """Attention as plain matmuls for counting: FlopCounterMode has no formula for xformers' kernel nor for
    SDPA's CPU flash kernel (both would count 0), and its CUDA flash/efficient formulas include the
    backward's recomputation of the scores, which is not model work. The math backend counts the same
    forward 2 and backward 4 batched matmuls per attention on every device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # patch.dict restores the switch as it was, set or unset, however the block ends.
    with mock.patch.dict(os.environ, {"LVDFLOW_DISABLE_XFORMERS": "1"}), sdpa_kernel(SDPBackend.MATH):
        yield


def count_step_flops(cfg: TrainConfig, batch: dict, dev: torch.device, fake: bool = False) -> int:
    """FLOPs of one training step (teacher forward, student forward and backward), counted on a fresh eager
    model: FlopCounterMode must never meet the compiled one (see the module docstring). These are the FLOPs
    the step executes: with stochastic depth above 0.1 the student's residual branches run on a subset of
    the batch (pretrain/layers/drop_path.py), so the skipped samples' work is not counted, as in the
    reference's 30-40% figure for the official code, which allows for the drop-path savings.
    `fake`: run the step on fake tensors (shapes only, no arithmetic), so a CPU counts a ViT-L step in seconds;
    the model is still built for real, as its initialisation reads values."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    meta = build_meta_arch(cfg).to(dev)
    counter = FlopCounterMode(display=False)
    with contextlib.ExitStack() as stack:
        if fake:
            mode = stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            batch = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        stack.enter_context(counter)
        stack.enter_context(pytorch_math_attention())
        stack.enter_context(torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"))
        loss, _ = meta(batch, 0.07)
        loss.backward()
    del meta, loss
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return counter.get_total_flops()


def step_flops(cfg: TrainConfig, batch: dict, dev: torch.device, fake: bool = False) -> tuple[int, int]:
    """The step's executed FLOPs (`count_step_flops` on `dev`), and those of the same step with every residual
    branch run on the whole batch: what a FLOP formula that ignores stochastic depth's savings counts (ViT-L's
    recipe, rate 0.4, skips a third). The second is counted on fake CPU tensors: run for real, that eager step
    would need far more GPU memory than the recipe's own (ViT-L at batch 64 on an 80 GB H100)."""
    executed = count_step_flops(cfg, batch, dev, fake)
    if cfg.drop_path_rate <= SUBSET_THRESHOLD:  # per-sample drop path: nothing is skipped
        return executed, executed
    cpu_batch = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return executed, count_step_flops(replace(cfg, drop_path_rate=0.0), cpu_batch, torch.device("cpu"), fake=True)


def _option_overrides(batch: int | None, centering: str | None) -> dict:
    """The command line's --batch and --centering as TrainConfig fields (unset: the recipe's)."""
    return {k: v for k, v in (("batch_size_per_rank", batch), ("centering", centering)) if v}


def join_single_process_group() -> None:
    """A one-process NCCL group, as `torchrun --nproc-per-node 1` gives the trainer (pretrain/train.py)."""
    import torch.distributed as dist

    from lvdflow.net import free_port

    if dist.is_initialized():
        return
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def recipe_step(meta, opt, batch: dict, device_type: str, autocast: bool = True) -> torch.Tensor:
    """One full training step as the trainer runs it: forward (teacher and student) under bf16 autocast,
    backward, clipping per network part, AdamW, EMA. Returns the loss."""
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        loss, _ = meta(batch, 0.07)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for k in meta.student.keys():
        torch.nn.utils.clip_grad_norm_(meta.student[k].parameters(), 3.0)
    opt.step()
    meta.update_teacher(0.994)
    return loss


def bench_arch(name: str, steps: int, warmup: int, batch: int | None, compile_blocks_flag: bool = False,
               profile_rows: int = 0, fsdp: bool = False, centering: str | None = None, device: str = "cuda",
               **overrides) -> dict:
    """One recipe's step time, memory and MFU. `fsdp`: the trainer's torchrun path, student and teacher
    sharded with FSDP2 (bf16 parameters for compute, float32 gradient reduction) in a one-process group;
    otherwise plain modules under bf16 autocast (CUDA) or float32 (CPU, a check of the path only).
    `name` is a RECIPES key or any ViT preset (then the ViT-S recipe's heads); `overrides` are TrainConfig
    fields on top."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if fsdp and not cuda:
        raise UserError("--fsdp measures the NCCL path: it needs --device cuda")
    cfg = recipe_config(name, **_option_overrides(batch, centering), **overrides)
    batch_t = synthetic_batch(cfg.batch_size_per_rank, cfg.local_crops_number, dev)
    flops, flops_full = step_flops(cfg, batch_t, dev)
    torch.manual_seed(0)
    meta = build_meta_arch(cfg).to(dev)
    if compile_blocks_flag:
        compile_for_training(meta)
    if fsdp:
        join_single_process_group()
        shard_with_fsdp2(meta, dev)
    groups = param_groups(meta.student, num_layers=len(meta.student["backbone"].blocks))
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], fused=True)
    apply_schedules(opt, lr=1e-4, last_layer_lr=1e-4, wd=0.04)

    def step():
        return recipe_step(meta, opt, batch_t, dev.type, autocast=cuda)

    for _ in range(warmup):
        step()
    synchronize(dev)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    host = 0.0
    for _ in range(steps):
        t_step = time.perf_counter()
        loss = step()
        host += time.perf_counter() - t_step
    synchronize(dev)
    dt = (time.perf_counter() - t) / steps
    mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    prof = profile_steps(step, 2, profile_rows) if profile_rows and cuda else {}
    if compile_blocks_flag:  # whether the blocks really compiled: one graph each, no breaks
        from torch._dynamo.utils import counters

        prof["dynamo"] = {"unique_graphs": counters["stats"]["unique_graphs"],
                          "graph_breaks": sum(counters["graph_break"].values()),
                          "break_reasons": [r[:200] for r in sorted(counters["graph_break"])[:5]]}  # fmt: skip
    gpu = torch.cuda.get_device_name(dev) if cuda else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None) if cuda else None
    return {"arch": name, "patch": 14, "batch": cfg.batch_size_per_rank, "crops": "2x224 + 8x98",
            "centering": cfg.centering,
            "mode": "FSDP2, bf16 params (one-process NCCL group)" if fsdp else
                    "bf16 autocast, no FSDP" if cuda else "float32 on CPU (path check, no FSDP)",
            "params_student_M": round(sum(p.numel() for p in meta.student.parameters()) / 1e6, 1),
            "s_per_step": round(dt, 4),
            # The step never waits for the GPU, so this is the host's time to queue it: near s_per_step means
            # the GPU starves (launch-bound); well below it means the GPU is the bottleneck.
            "host_enqueue_s_per_step": round(host / steps, 4), "images_per_s": round(cfg.batch_size_per_rank / dt, 1),
            "peak_mem_GiB": round(mem, 2) if mem is not None else None, "tflops_per_step": round(flops / 1e12, 3),
            "achieved_tflops": round(flops / dt / 1e12, 1),
            "mfu_percent": round(100 * flops / dt / peak, 1) if peak else None,
            "tflops_per_step_without_drop_path_savings": round(flops_full / 1e12, 3),
            "mfu_percent_without_drop_path_savings": round(100 * flops_full / dt / peak, 1) if peak else None,
            "loss": float(loss.detach()), "gpu": gpu, **prof}


def count_arch(name: str, batch: int | None, centering: str | None) -> dict:
    """`--flops-only`: one recipe's FLOPs per step, executed and without stochastic depth's savings, counted on
    fake tensors on the CPU (no GPU, no arithmetic); MFU for a measured step time t is tflops / t / peak."""
    cfg = recipe_config(name, **_option_overrides(batch, centering))
    cpu = torch.device("cpu")
    executed, full = step_flops(cfg, synthetic_batch(cfg.batch_size_per_rank, cfg.local_crops_number, cpu), cpu,
                                fake=True)
    return {"arch": name, "batch": cfg.batch_size_per_rank, "crops": "2x224 + 8x98",
            "drop_path_rate": cfg.drop_path_rate, "tflops_per_step": round(executed / 1e12, 3),
            "tflops_per_step_without_drop_path_savings": round(full / 1e12, 3),
            "executed_fraction": round(executed / full, 4)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="vit_small,vit_large")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="torch.compile each transformer block and the loss kernels")
    ap.add_argument("--centering", choices=("centering", "sinkhorn_knopp"),
                    help="override the recipe's (ViT-S: softmax centering; ViT-L: Sinkhorn-Knopp, as DINOv2's vitl14)")
    ap.add_argument("--fsdp", action="store_true", help="shard with FSDP2 in a one-process NCCL group (the trainer's "
                    "torchrun path: bf16 parameters) instead of plain bf16 autocast")
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="also profile two steps and print the top ROWS kernels by CUDA time")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: run the same path small (e.g. --archs vit_tiny --batch 2 --steps 1) to check it")
    ap.add_argument("--flops-only", action="store_true",
                    help="count each recipe's FLOPs per step on the CPU (fake tensors, seconds) and time nothing")
    ap.add_argument("--result", help="default bench/results/pretrain_gpu.json (CPU checks: pretrain_gpu_cpu.json, "
                    "so they never replace the GPU figures; --flops-only: pretrain_flops.json)")
    args = ap.parse_args()
    bench_name = ("pretrain_flops" if args.flops_only else
                  "pretrain_gpu" if args.device == "cuda" else "pretrain_gpu_cpu")
    args.result = args.result or str(ROOT / "bench" / "results" / f"{bench_name}.json")
    if args.device == "cuda" and not torch.cuda.is_available() and not args.flops_only:
        print("no CUDA device: nothing to measure (--device cpu checks the path)", file=sys.stderr)
        return 1
    unknown = [a for a in args.archs.split(",") if a not in ARCHS]
    if unknown:
        print(f"unknown --archs {', '.join(unknown)}; choose from {', '.join(ARCHS)}", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for name in args.archs.split(","):
        try:
            if args.flops_only:
                rows.append(count_arch(name, args.batch or None, args.centering))
            else:
                rows.append(bench_arch(name, args.steps, args.warmup, args.batch or None, args.compile,
                                       args.profile, args.fsdp, args.centering, args.device))
                rows[-1]["compiled_blocks"] = args.compile
        except UserError as e:  # an impossible recipe (--batch 1) or option (--fsdp on CPU): one line, no traceback
            print(e, file=sys.stderr)
            return 2
        print(json.dumps(rows[-1]), flush=True)
        if args.device == "cuda" and not args.flops_only:
            torch.cuda.empty_cache()
    result = {"bench": bench_name, "device": "cpu (fake tensors)" if args.flops_only else args.device,
              "command": "bench/bench_pretrain_gpu.py " + " ".join(sys.argv[1:]), "torch": torch.__version__,
              "rows": rows}
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
