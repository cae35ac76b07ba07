"""Host overhead of one DINOv2 training step, without a GPU: the step's Python, dispatch and Dynamo costs.

    python3 -m bench.host_overhead_pretrain_step [--arch vit_large] [--widths 16 32] [--steps 30]

A GPU step can be no faster than the host takes to queue it (the step never waits for the GPU: see
tests/test_pretrain_meta_arch.py's sync test). This bench runs bench_pretrain_gpu's recipe step (teacher
forward, student forward and backward, clipping, fused AdamW, EMA; bf16 autocast) on the CPU with the
recipe's module structure (depth, heads, head layers, crop counts) but tiny widths and crops, where the
arithmetic is negligible: what is left is the per-op and per-module cost that a GPU host pays too. Two
widths are run; nearly equal times confirm that the figure is overhead, not arithmetic. For each, eager and
with `compile_for_training` (compiled blocks and loss kernels):
- `ms_per_step`, `ms_per_step_min`: median and fastest wall time of a step (float32: see `measure`; this
  shared CPU's times vary by up to 2x between runs);
- `aten_ops_outside_compiled`: top-level ATen ops dispatched one by one (each a kernel launch on a GPU);
- `compiled_region_calls`: compiled graphs entered (forward regions and their backward functions);
both counted under bf16 autocast, as the GPU step runs.
This CPU's per-op cost is not a GPU host's, so the times are an estimate of the order of magnitude; the op
counts are exact. Writes bench/results/host_overhead_pretrain_step.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_pretrain_gpu import RECIPES, recipe_config, recipe_step  # noqa: E402
from bench.common import write_result  # noqa: E402
from pretrain.config import TrainConfig  # noqa: E402
from pretrain.masking import MaskingGenerator, collate_crops  # noqa: E402
from pretrain.models.vit import ARCHS  # noqa: E402
from pretrain.param_groups import apply_schedules, param_groups  # noqa: E402
from pretrain.train import build_meta_arch, compile_for_training  # noqa: E402

PATCH, GLOBAL_PX, LOCAL_PX, N_LOCAL = 14, 56, 14, 8  # 4x4 patches per global crop, 1 per local crop


def tiny_config(arch: str, width: int, batch: int) -> TrainConfig:
    """The recipe's structure at `width` channels: heads keep their count (head dim = width / heads)."""
    heads = ARCHS[RECIPES[arch]["arch"]]["num_heads"]
    ibot_bottleneck = width // 3 if RECIPES[arch].get("ibot_head_bottleneck_dim") else 0  # vitl14: 256 next to 384
    return recipe_config(arch, batch_size_per_rank=batch, dino_prototypes=4 * width, ibot_prototypes=4 * width,
                         head_hidden_dim=width, head_bottleneck_dim=width // 2, ibot_head_bottleneck_dim=ibot_bottleneck,
                         patch_size=PATCH, img_size=GLOBAL_PX, global_crops_size=GLOBAL_PX, local_crops_size=LOCAL_PX,
                         local_crops_number=N_LOCAL, embed_dim=width - width % heads, num_heads=heads)


def tiny_batch(batch: int) -> dict:
    samples = [{"global_crops": [torch.randn(3, GLOBAL_PX, GLOBAL_PX) for _ in range(2)],
                "local_crops": [torch.randn(3, LOCAL_PX, LOCAL_PX) for _ in range(N_LOCAL)]} for _ in range(batch)]
    side = GLOBAL_PX // PATCH
    return collate_crops(samples, n_tokens=side * side, rng=np.random.default_rng(0),
                         mask_generator=MaskingGenerator((side, side), max_num_patches=side * side // 2))


def count_dispatch(step) -> tuple[int, int]:
    """(top-level ATen ops outside compiled regions, compiled regions entered) in one step."""
    from torch.profiler import profile

    with profile() as p:
        step()
    outside = regions = 0
    for e in p.events():
        name = e.name
        if name.startswith("Torch-Compiled Region") or name.startswith("CompiledFunctionBackward"):
            regions += 1
            continue
        if not name.startswith("aten::"):
            continue
        parent, top, inside = e.cpu_parent, True, False
        while parent is not None:
            if parent.name.startswith("aten::"):
                top = False
            if parent.name.startswith(("Torch-Compiled Region", "CompiledFunction")):
                inside = True
            parent = parent.cpu_parent
        outside += top and not inside
    return outside, regions


def measure(arch: str, width: int, batch: int, compiled: bool, steps: int) -> dict:
    cfg = tiny_config(arch, width, batch)
    torch.manual_seed(0)
    meta = build_meta_arch(cfg)
    if compiled:
        compile_for_training(meta)
    groups = param_groups(meta.student, num_layers=len(meta.student["backbone"].blocks))
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], fused=True)
    apply_schedules(opt, lr=1e-4, last_layer_lr=1e-4, wd=0.04)
    batch_t = tiny_batch(batch)

    def step(autocast: bool = True):
        recipe_step(meta, opt, batch_t, "cpu", autocast)

    # Timed in float32: this CPU has no bf16 matrix units, so even tiny bf16 GEMMs cost ~0.3 ms each here
    # and would swamp the overhead; autocast's own ops (the weight casts) are in the counts below.
    for _ in range(3):  # compiles (twice: grad mode), creates the optimizer state
        step(autocast=False)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step(autocast=False)
        times.append(time.perf_counter() - t)
    for _ in range(2):  # bf16 autocast, as on the GPU: compiles again (autocast is part of the guards)
        step()
    outside, regions = count_dispatch(step)
    return {"arch": arch, "width": cfg.embed_dim, "depth": len(meta.student["backbone"].blocks), "batch": batch,
            "compiled": compiled, "ms_per_step": round(1e3 * statistics.median(times), 1),
            "ms_per_step_min": round(1e3 * min(times), 1),
            "aten_ops_outside_compiled": outside, "compiled_region_calls": regions}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="vit_large", choices=sorted(RECIPES))
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)  # one host thread queues a GPU step; more would hide per-op cost in parallel work
    rows = []
    for width in args.widths:
        for compiled in (False, True):
            rows.append(measure(args.arch, width, args.batch, compiled, args.steps))
            print(rows[-1], flush=True)
    write_result("host_overhead_pretrain_step",
                 {"command": "python3 -m bench.host_overhead_pretrain_step " + " ".join(sys.argv[1:]), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
