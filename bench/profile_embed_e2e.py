"""GPU timeline of the embedding stage end to end: where the GPU waits while `run_embed` runs.

    python3 -m bench.profile_embed_e2e [--images 12000] [--workers 16] [--skip 8] [--active 8]
                                       [--trace OUT.json.gz] [--json OUT.json]

`run_embed` (the stage, decode workers and all) embeds a synthetic pool of 500x375 JPEGs with ViT-H/14 at 224.
A torch.profiler schedule driven by the stage's progress callback (one step per batch) records `--active`
steady batches after `--skip` batches (worker start-up, compilation). From that window it reports:
- the wall time per batch and the GPU busy time (union of kernel and copy intervals) per batch;
- the GPU's idle gaps, longest first, each with the main-thread CPU operations running during it;
- kernel time by name, to set beside the model-only profile (bench/profile_embed_gpu.py).
With `--events` instead, no profiler runs (its CPU overhead changes the loop it watches): CUDA events around
each batch's forward give the GPU time per batch and the GPU idle time between batches over the whole run.
Then the same model runs back to back on one resident batch (no loader, no per-batch sync): the sustained
model-only rate that the end-to-end figure should approach.
Not part of `make bench` (its name does not start with bench_): a tool for a lent GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

from bench.bench_embed import make_pool, steady_rates


def _intervals(events) -> list[tuple[float, float, str]]:
    # Kernels and copies only: the profiler's step annotations also sit on the GPU timeline, spanning it all.
    return sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                  if e.device_type == DeviceType.CUDA and not e.name.startswith("ProfilerStep"))


def _union(iv: list[tuple[float, float, str]]) -> tuple[float, list[tuple[float, float]]]:
    """Busy time of overlapping intervals, and the gaps between them (microseconds)."""
    busy, gaps = 0.0, []
    cur_s, cur_e = iv[0][0], iv[0][1]
    for s, e, _ in iv[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append((cur_e, s))
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    return busy, gaps


def analyse(events, n_batches: int, top: int = 12) -> dict:
    iv = _intervals(events)
    if not iv:
        return {"error": "no CUDA events recorded"}
    span = iv[-1][1] - iv[0][0]
    busy, gaps = _union(iv)
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    gap_rows = []
    for s, e in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        during = sorted({c.name for c in cpu if c.time_range.start < e and c.time_range.end > s})
        gap_rows.append({"gap_ms": (e - s) / 1e3, "at_ms": (s - iv[0][0]) / 1e3, "cpu_ops_overlapping": during[:15]})
    by_name: dict[str, float] = defaultdict(float)
    for s, e, name in iv:
        by_name[name[:90]] += e - s
    gap_hist = {f">{t}ms": sum((e - s) / 1e3 for s, e in gaps if (e - s) / 1e3 > t) for t in (0.05, 0.5, 5)}
    return {
        "batches": n_batches,
        "gpu_span_ms": span / 1e3,
        "gpu_busy_ms": busy / 1e3,
        "gpu_busy_fraction": busy / span,
        "span_per_batch_ms": span / 1e3 / n_batches,
        "busy_per_batch_ms": busy / 1e3 / n_batches,
        "idle_ms_in_gaps_longer_than": gap_hist,
        "gaps": len(gaps),
        "longest_gaps": gap_rows,
        "kernel_ms_per_batch_top": {
            k: v / 1e3 / n_batches for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:20]
        },
    }


def forward_events(fn_run) -> dict:
    """Run `fn_run()` with CUDA events around every `_Embedder._forward`; GPU forward time per batch and GPU
    idle between consecutive forwards (transform and upload included there), after the first two batches."""
    import curation.embed as embed_mod

    pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    original = embed_mod._Embedder._forward

    def timed(self, images):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = original(self, images)
        end.record()
        pairs.append((start, end))
        return out

    embed_mod._Embedder._forward = timed
    try:
        fn_run()
    finally:
        embed_mod._Embedder._forward = original
    torch.cuda.synchronize()
    fwd = [s.elapsed_time(e) for s, e in pairs[2:]]
    idle = [pairs[i][1].elapsed_time(pairs[i + 1][0]) for i in range(2, len(pairs) - 1)]
    q = lambda v, f: sorted(v)[int(f * (len(v) - 1))]  # noqa: E731
    return {
        "batches_timed": len(fwd),
        "gpu_forward_ms_mean": sum(fwd) / len(fwd),
        "gpu_forward_ms_p10_p50_p90": [q(fwd, 0.1), q(fwd, 0.5), q(fwd, 0.9)],
        "gpu_gap_between_forwards_ms_mean": sum(idle) / len(idle),
        "gpu_gap_ms_p50_p90_max": [q(idle, 0.5), q(idle, 0.9), max(idle)],
        "gpu_forward_ms_first_last_10": [sum(fwd[:10]) / 10, sum(fwd[-10:]) / 10],
    }


def back_to_back(batch: int, n: int) -> dict:
    """The stage's model on one resident batch, `n` forwards queued without a sync in between."""
    from curation.embed import CUDA_INFERENCE, embed_batch, prepare_for_inference
    from pretrain.models import build_vit

    torch.manual_seed(0)
    model = prepare_for_inference(build_vit("vit_huge", patch_size=14, img_size=224), torch.device("cuda"), True,
                                  **CUDA_INFERENCE)  # fmt: skip
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    with torch.inference_mode():
        for _ in range(3):
            embed_batch(model, x)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            embed_batch(model, x)
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return {"batches": n, "batch_size": batch, "images_per_s": n * batch / dt, "batch_ms": dt / n * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=12000)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--skip", type=int, default=8)
    ap.add_argument("--active", type=int, default=8)
    ap.add_argument("--b2b-batches", type=int, default=40)
    ap.add_argument("--trace", default=None, help="write the chrome trace here (.json.gz)")
    ap.add_argument("--events", action="store_true", help="CUDA events per batch instead of the profiler")
    ap.add_argument("--shard-size", type=int, default=50_000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from curation.embed import run_embed
    from curation.ingest import run_ingest

    result: dict = {"args": vars(args), "gpu": torch.cuda.get_device_name()}
    with tempfile.TemporaryDirectory() as tmp:
        make_pool(Path(tmp) / "pool", args.images)
        run_ingest([Path(tmp) / "pool"], Path(tmp) / "ingest", workers=None)
        marks: list[tuple[float, int]] = []
        run = lambda progress: run_embed(Path(tmp) / "ingest", None, Path(tmp) / "emb", arch="vit_huge",  # noqa: E731
                                         patch_size=14, img_size=224, allow_random_init=True,
                                         batch_size=args.batch, num_workers=args.workers, device="cuda",
                                         shard_size=args.shard_size, progress=progress)  # fmt: skip
        if args.events:
            mark = lambda done, total: marks.append((time.perf_counter(), done))  # noqa: E731
            result["events"] = forward_events(lambda: run(mark))
        else:
            result.update(profiled_window(run, marks, args))
    result.update(steady_rates(marks, args.batch))
    print(json.dumps(result, indent=1), flush=True)
    torch.cuda.empty_cache()
    result["model_only_back_to_back"] = back_to_back(args.batch, args.b2b_batches)
    print(json.dumps(result["model_only_back_to_back"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


def profiled_window(run, marks: list[tuple[float, int]], args: argparse.Namespace) -> dict:
    """`run(progress)` under a profiler stepping once per batch; the window's wall rate and GPU timeline."""
    sched = schedule(wait=args.skip, warmup=2, active=args.active, repeat=1)
    captured = {}

    def ready(p) -> None:
        captured["events"] = p.events()
        if args.trace:
            p.export_chrome_trace(args.trace)

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=activities, schedule=sched, on_trace_ready=ready) as prof:

        def progress(done: int, total: int) -> None:
            marks.append((time.perf_counter(), done))
            prof.step()

        run(progress)
    out: dict = {}
    a, b = args.skip + 2, args.skip + 2 + args.active
    if len(marks) > b:
        (t_a, d_a), (t_b, d_b) = marks[a], marks[b]
        out["window_wall_per_batch_ms"] = (t_b - t_a) / args.active * 1e3
        out["window_images_per_s"] = (d_b - d_a) / (t_b - t_a)
    out["timeline"] = analyse(captured["events"], args.active) if captured else {"error": "no trace"}
    return out


if __name__ == "__main__":
    main()
