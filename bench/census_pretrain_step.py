"""Census of one DINOv2 training step's memory traffic, op by op, on the CPU: where a GPU step's time goes
outside the GEMMs, without a GPU.

    python3 -m bench.census_pretrain_step [--arch vit_large] [--depth 4] [--batches 2 4] [--at-batch 32]

Runs bench_pretrain_gpu's recipe step (teacher forward, student forward and backward, clipping, AdamW, EMA)
under CPU bf16 autocast, as the GPU step runs under CUDA autocast, with a dispatch mode that records every
ATen op: the bytes it reads and writes (its tensor arguments and results) and, for matrix products, its
FLOPs, attributed to the module running it (forward or backward). A GPU runs the non-GEMM ops at memory
speed, so their bytes / HBM bandwidth is a floor under their time; the GEMMs' FLOPs / peak is theirs.

To keep the CPU work small the backbone has `depth` blocks (all blocks of a ViT are alike: block figures are
scaled to the real depth), and the step runs at two batch sizes, from which every group's bytes are fitted
as fixed + per-image and extrapolated to `--at-batch`. It is a census of the eager step only: under a
dispatch mode Dynamo skips compiled frames and runs them eagerly, so a compiled step cannot be observed this
way (a `--compile` option, removed on 2026-11-23, recorded the same ops as eager).
Writes bench/results/census_pretrain_step.json.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.module_tracker import ModuleTracker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_pretrain_gpu import RECIPES, recipe_config, synthetic_batch  # noqa: E402
from bench.common import write_result  # noqa: E402
from pretrain.param_groups import apply_schedules, param_groups  # noqa: E402
from pretrain.train import build_meta_arch  # noqa: E402

H100_HBM_BYTES_PER_S = 3.35e12
H100_BF16_FLOPS = 989e12
_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_flash_attention_for_cpu_backward", "convolution", "convolution_backward"}
_VIEWS = {"view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze", "select",
          "slice", "as_strided", "alias", "detach", "split", "split_with_sizes", "unbind", "chunk", "unflatten",
          "flatten", "_reshape_alias", "view_as", "diagonal", "narrow"}


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def _matmul_flops(name: str, args, out) -> float:
    if name in ("mm", "addmm"):
        a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
        return 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
    if name in ("bmm", "baddbmm"):
        a, b = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
        return 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    return 0.0  # attention / convolution: counted by bench_pretrain_gpu's FlopCounter, not here


class Census(TorchDispatchMode):
    def __init__(self, tracker: ModuleTracker, phase: list):
        super().__init__()
        self.tracker, self.phase = tracker, phase
        self.rows: dict = collections.defaultdict(lambda: [0, 0.0, 0.0])  # key -> [calls, bytes, flops]

    def _where(self) -> str:
        names = [p for p in self.tracker.parents if p != "Global"]
        deepest = max(names, key=lambda n: n.count("."), default="")
        where = re.sub(r"blocks\.\d+", "blocks.*", deepest)
        where = re.sub(r"^(student|teacher)\.", r"\1.", where)
        if self.phase[0] != "step":
            return self.phase[0]
        return ("bw " if self.tracker.is_bw else "fw ") + (where or "(no module)")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._overloadpacket.__name__
        if name in _VIEWS:
            return out
        seen, nbytes = set(), 0
        for t in list(_tensors(args)) + list(_tensors(kwargs or {})) + list(_tensors(out)):
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key not in seen:
                seen.add(key)
                nbytes += t.numel() * t.element_size()
        row = self.rows[(self._where(), name)]
        row[0] += 1
        row[1] += nbytes
        row[2] += _matmul_flops(name, args, out)
        return out


def census_at(arch: str, depth: int, batch: int) -> dict:
    cfg = recipe_config(arch, depth=depth, batch_size_per_rank=batch)
    torch.manual_seed(0)
    meta = build_meta_arch(cfg)
    groups = param_groups(meta.student, num_layers=depth)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], foreach=True)
    apply_schedules(opt, lr=1e-4, last_layer_lr=1e-4, wd=0.04)
    batch_t = synthetic_batch(batch, 8, torch.device("cpu"))
    phase = ["step"]

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = meta(batch_t, 0.07)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        phase[0] = "clip"
        for k in meta.student.keys():
            torch.nn.utils.clip_grad_norm_(meta.student[k].parameters(), 3.0)
        phase[0] = "optimizer"
        opt.step()
        phase[0] = "ema"
        meta.update_teacher(0.994)
        phase[0] = "step"

    step()  # warm-up: creates the optimizer state
    with ModuleTracker() as tracker, Census(tracker, phase) as census:
        step()
    return {k: v for k, v in census.rows.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="vit_large", choices=sorted(RECIPES))
    ap.add_argument("--depth", type=int, default=4, help="blocks actually run (scaled to the real depth)")
    ap.add_argument("--batches", type=int, nargs=2, default=[2, 4])
    ap.add_argument("--at-batch", type=int, default=0, help="extrapolate to this batch (0: the recipe's)")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    real_depth = {"vit_small": 12, "vit_base": 12, "vit_large": 24}[args.arch]
    at = args.at_batch or RECIPES[args.arch]["batch_size_per_rank"]
    b1, b2 = args.batches
    c1, c2 = (census_at(args.arch, args.depth, b) for b in (b1, b2))
    rows = []
    for key in sorted(set(c1) | set(c2)):
        (calls1, by1, fl1), (calls2, by2, fl2) = c1.get(key, [0, 0, 0]), c2.get(key, [0, 0, 0])
        scale = real_depth / args.depth if ".blocks.*" in key[0] else 1.0
        per_image_b, per_image_f = (by2 - by1) / (b2 - b1), (fl2 - fl1) / (b2 - b1)
        nbytes = max(0.0, by1 + (at - b1) * per_image_b) * scale
        flops = max(0.0, fl1 + (at - b1) * per_image_f) * scale
        rows.append({"where": key[0], "op": key[1], "calls": round(calls2 * scale), "GB": round(nbytes / 1e9, 3),
                     "GFLOP": round(flops / 1e9, 1)})
    gemm = [r for r in rows if r["op"] in _MATMULS]
    other = [r for r in rows if r["op"] not in _MATMULS]
    other_gb = sum(r["GB"] for r in other)
    by_where: dict = collections.Counter()
    by_op: dict = collections.Counter()
    for r in other:
        by_where[r["where"]] += r["GB"]
        by_op[r["op"]] += r["GB"]
    summary = {
        "arch": args.arch, "at_batch": at, "depth_run": args.depth, "depth": real_depth,
        "gemm_TFLOP": round(sum(r["GFLOP"] for r in gemm) / 1e3, 2),
        "gemm_ms_at_h100_peak": round(sum(r["GFLOP"] for r in gemm) * 1e9 / H100_BF16_FLOPS * 1e3, 1),
        "other_GB": round(other_gb, 1),
        "other_ms_at_h100_hbm": round(other_gb * 1e9 / H100_HBM_BYTES_PER_S * 1e3, 1),
        "other_calls": sum(r["calls"] for r in other),
        "top_modules_GB": {k: round(v, 2) for k, v in by_where.most_common(args.top)},
        "top_ops_GB": {k: round(v, 2) for k, v in by_op.most_common(args.top)},
        "top_rows": sorted(other, key=lambda r: -r["GB"])[: args.top],
    }
    write_result("census_pretrain_step",
                 {"command": "python3 -m bench.census_pretrain_step " + " ".join(sys.argv[1:]), **summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
