"""The training loop pretraining (pretrain/train.py) and distillation (pretrain/distill/train.py) share.

Each trainer builds its model, optimizer, schedules and batch stream, describes itself as a `LoopSpec`
(what to call, what to checkpoint, which gradients to clip, how to update its EMA, what to export) and
hands it to `run_loop`, which owns the per-iteration steps: batch, one optimisation step, metric reduction
and the stop on a non-finite loss, the metrics record, checkpoints, periodic exports with kNN. A step's
metrics are read one step late, so the host queues step i+1 while the device runs step i; no checkpoint or
export is written before the loss of the step it holds has been checked. `resume`
restores a run from its latest checkpoint and `finish` closes it. The public steps can also be called one
by one (the distillation tests drive `optimizer_step` by hand).

The order of operations is the trainers' original one, so a killed and resumed run still reproduces the
uninterrupted run bitwise (CPU, one process).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from pretrain.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from pretrain.config import TrainConfig
from pretrain.distributed import all_reduce_sum, is_dist, rank, world_size
from pretrain.meta_arch import TrainingDiverged
from pretrain.metrics_log import MetricsLog, plot_curves
from pretrain.normalise import normalise_crops
from pretrain.param_groups import apply_schedules
from pretrain.schedules import build_schedules, scaled_lr


# ---- small steps -------------------------------------------------------------------------------------
def knn_eval(backbone, cfg: TrainConfig, eval_train, eval_test, device) -> dict:
    """kNN top-1 (k 10 / 20) of `backbone` on the ImageFolder pair, at the config's evaluation size."""
    from pretrain.evaluate import evaluate_backbone

    res = evaluate_backbone(backbone, eval_train, eval_test, "knn",
                            image_size=cfg.eval_image_size or cfg.global_crops_size, device=device)
    return {k: v for k, v in res.items() if k.startswith("knn_top1")}


def eval_device(device: torch.device):
    return "cpu" if device.type == "cpu" else device


class PendingMetrics:
    """One step's metrics, averaged over ranks on the device and copied to the host without waiting.

    The loop reads them one step later, once the host has queued the next step: reading at once (as
    `.tolist()` would) makes the host wait for the device to drain at every step boundary, and the GPU then
    idles while the host prepares and launches the next step. The copy is queued right behind the step's
    own kernels, so the read waits for nothing after them."""

    def __init__(self, metrics: dict, device):
        self.keys = sorted(metrics)
        vec = torch.stack([metrics[k].detach().float().to(device).reshape(()) for k in self.keys])
        vec = all_reduce_sum(vec) / world_size()
        self.ready = None
        if vec.is_cuda:
            self.host = vec.to("cpu", non_blocking=True)  # into pinned memory, ordered after the step
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host = vec

    def values(self) -> dict[str, float]:
        if self.ready is not None:
            self.ready.synchronize()
        return {k: float(v) for k, v in zip(self.keys, self.host.tolist())}


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device`, its uint8 crops normalised there (`normalise_crops`). To a GPU through
    pinned memory: a copy from pageable memory makes the host wait for the device to finish all queued work
    first, i.e. the previous step."""
    def move(v):
        if not isinstance(v, torch.Tensor):
            return v
        if device.type == "cuda" and v.device.type == "cpu" and not v.is_pinned():
            v = v.pin_memory()
        return v.to(device, non_blocking=True)

    return normalise_crops({k: move(v) for k, v in batch.items()})


def build_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over param_groups() output (the schedules set each group's lr / weight decay every step).
    On CUDA the fused kernel (one launch for all parameters instead of a chain of foreach kernels);
    elsewhere the default, so CPU runs stay bitwise reproducible across versions of this code."""
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups],
                             betas=tuple(cfg.adamw_betas), fused=fused or None)


def lr_and_schedules(cfg: TrainConfig, global_batch: int):
    """(peak lr after the batch-size rule, the per-iteration schedules) of a config."""
    lr = scaled_lr(cfg.base_lr, global_batch) if cfg.lr_scaling == "sqrt_wrt_1024" else cfg.base_lr
    return lr, build_schedules(
        total_iters=cfg.total_iters, lr=lr, min_lr=cfg.min_lr, warmup_iters=cfg.warmup_iters,
        weight_decay=cfg.weight_decay, weight_decay_end=cfg.weight_decay_end,
        momentum_teacher=cfg.momentum_teacher, final_momentum_teacher=cfg.final_momentum_teacher,
        teacher_temp=cfg.teacher_temp, warmup_teacher_temp=cfg.warmup_teacher_temp,
        warmup_teacher_temp_iters=cfg.warmup_teacher_temp_iters, freeze_last_layer_iters=cfg.freeze_last_layer_iters)


def optimizer_step(model, optimizer, batch: dict, s: dict, *, cfg: TrainConfig, clip_modules: list,
                   autocast, update_ema: Callable[[float], None]) -> dict:
    """One iteration's update: schedules -> forward -> backward -> clipping -> step -> EMA.

    `model(batch, teacher_temp)` returns (loss, metrics). Gradients are clipped per module of
    `clip_modules` (DINOv2 clips per submodule). Returns the metrics.

    The prototypes are frozen for the first `freeze_last_layer_iters` by their learning rate alone (the
    schedule's `last_layer_lr` is 0, as in DINOv2), not by zeroing their gradients (DINOv1's way): AdamW
    counts the steps it is given, so zero gradients would leave its second moment near 0 at the unfreeze
    and its first updates several times too large."""
    apply_schedules(optimizer, lr=s["lr"], last_layer_lr=s["last_layer_lr"], wd=s["wd"])
    with autocast:
        loss, metrics = model(batch, s["teacher_temp"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip_grad:
        for module in clip_modules:
            torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.clip_grad)
    optimizer.step()
    update_ema(s["momentum"])
    return metrics


def check_finite(reduced: dict, it: int, ckroot: Path, what: str = "loss") -> None:
    if not math.isfinite(reduced["total_loss"]):
        parts = ", ".join(f"{k}={v:.4g}" for k, v in reduced.items() if k.endswith("loss"))
        raise TrainingDiverged(f"non-finite {what} at iteration {it} ({parts}); lower the learning rate "
                               f"or check the data; the last checkpoint is in {ckroot}")


def resume(ckroot: Path, model: torch.nn.Module, optimizer, stream,
           check: Callable[[Path], None] | None = None) -> int:
    """Restore model, optimizer, RNG and data position from the latest checkpoint under `ckroot` (`check`
    may refuse it first). Returns the iteration to start from (0 without a checkpoint)."""
    ckpt = latest_checkpoint(ckroot)
    if ckpt is None:
        return 0
    if check is not None:
        check(ckpt)
    info = load_checkpoint(ckpt, model, optimizer)
    data = info["data"]
    # Positions saved before the reader split epochs by sample (no "split" key) mean nothing to today's plan
    # when several ranks read: as on another process count, every rank starts after rank 0's epoch, together.
    whole_shard_split = data is not None and data.get("split") != "samples" and world_size() > 1
    if data is not None and not whole_shard_split:
        stream.load_state_dict(data)
    else:
        saved = info["data_rank0"] or {}
        if "epoch" in saved:
            stream.start_after_epoch(saved["epoch"])
        if rank() == 0:
            why = ("its data positions are from the reader's earlier whole-shard rank split" if whole_shard_split
                   else f"checkpoint written by {info['saved_world_size']} processes, now {world_size()}")
            print(f"resume: {why}; model, optimizer and schedules resume exactly, the data streams start the "
                  f"next epoch", flush=True)
    return info["iteration"]


# ---- the loop ----------------------------------------------------------------------------------------
@dataclass
class LoopSpec:
    """What run_loop needs to know about one trainer."""

    model: torch.nn.Module  # model(batch, teacher_temp) -> (loss, metrics with "total_loss")
    checkpointed: torch.nn.Module  # what a checkpoint holds (with the optimizer)
    optimizer: Any
    sched: Any  # schedules.at(it) -> {lr, last_layer_lr, wd, momentum, teacher_temp}
    stream: Any  # data.BatchStream
    clip_modules: list  # gradient clipping, per module, in this order
    update_ema: Callable[[float], None]
    # Collective: writes an export under the given folder; rank 0 gets {metric prefix: backbone} to evaluate.
    export: Callable[[Path, int], dict]
    checkpoint_config: dict
    build_augmentation: Callable[[bool], Any]  # highres -> multi-crop augmentation
    prepare_batch: Callable[[dict], dict] | None = None  # applied after the batch reaches the device
    on_first_step: Callable[[dict], None] | None = None  # rank 0, with the first iteration's metrics
    what: str = "loss"  # for the non-finite-loss message


def run_loop(cfg: TrainConfig, out: Path, spec: LoopSpec, *, device: torch.device, start: int, global_batch: int,
             eval_train=None, eval_test=None) -> tuple[MetricsLog, dict, int]:
    """Iterations `start` .. stop (cfg.stop_after or total_iters). Returns (the open metrics log, the last
    logged record, stop)."""
    out = Path(out)
    ckroot = out / "checkpoints"
    log = MetricsLog(out, start, enabled=rank() == 0)
    stop = min(cfg.stop_after or cfg.total_iters, cfg.total_iters)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    augs: dict = {}
    highres_from = cfg.total_iters - cfg.highres_iters if cfg.highres_iters else cfg.total_iters + 1
    last_record: dict = {}
    t_last, n_since = time.perf_counter(), 0
    pending: tuple | None = None  # (iteration, schedules, highres, PendingMetrics) not yet read

    def settle() -> None:
        """Read the pending step's metrics: stop on a non-finite loss, naming its iteration; log them."""
        nonlocal pending, last_record, t_last, n_since
        if pending is None:
            return
        it, s, highres, metrics = pending
        pending = None
        reduced = metrics.values()
        n_since += 1
        check_finite(reduced, it, ckroot, spec.what)
        if it == start and rank() == 0 and spec.on_first_step is not None:
            spec.on_first_step(reduced)
        done = it + 1
        if it == start or done % cfg.log_every == 0 or done == stop:
            now = time.perf_counter()
            last_record = {"iteration": it, **reduced, **s, "highres": highres,
                           "images_per_s": n_since * global_batch / max(now - t_last, 1e-9),
                           "s_per_iter": (now - t_last) / max(n_since, 1)}
            t_last, n_since = now, 0
            log.log(last_record)
            if rank() == 0:
                print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in last_record.items()}),
                      flush=True)

    spec.model.train()
    try:
        for it in range(start, stop):
            highres = it >= highres_from
            if highres not in augs:
                augs[highres] = spec.build_augmentation(highres)
            batch = to_device(spec.stream.next_batch(it, augs[highres], cfg.patch_size), device)
            if spec.prepare_batch is not None:
                batch = spec.prepare_batch(batch)
            s = spec.sched.at(it)
            metrics = optimizer_step(spec.model, spec.optimizer, batch, s, cfg=cfg,
                                     clip_modules=spec.clip_modules, autocast=autocast, update_ema=spec.update_ema)
            step_metrics = PendingMetrics(metrics, device)
            settle()  # the previous step's, while this one runs
            pending = (it, s, highres, step_metrics)
            done = it + 1
            want_checkpoint = done % cfg.checkpoint_every == 0 or done == stop
            want_eval = bool(cfg.eval_every and eval_train and eval_test and done % cfg.eval_every == 0 and done < stop)
            want_export = bool(cfg.export_every and done % cfg.export_every == 0) or want_eval
            if want_checkpoint or want_export:
                settle()  # nothing is saved from a step whose loss is not known to be finite
            if want_checkpoint:
                save_checkpoint(ckroot, done, spec.checkpointed, spec.optimizer, spec.stream.state_dict(),
                                spec.checkpoint_config, cfg.keep_checkpoints)
            if want_export:
                backbones = spec.export(out / "exports" / f"it_{done:08d}", done)
                for prefix, backbone in backbones.items() if want_eval else ():
                    res = knn_eval(backbone, cfg, eval_train, eval_test, eval_device(device))
                    record = {"iteration": it, **{f"{prefix}{k}": v for k, v in res.items()}}
                    log.log(record)
                    print(json.dumps(record), flush=True)
                if is_dist():
                    dist.barrier()
        settle()
    finally:
        close = getattr(spec.stream, "close", None)  # stops the data worker processes
        if close is not None:
            close()
    return log, last_record, stop


def finish(log: MetricsLog, out: Path) -> str | None:
    """Collective end of a run: curves.png (rank 0), the metrics log closed. Returns the PNG's path."""
    png = plot_curves(log.path, Path(out) / "curves.png") if rank() == 0 else None
    log.close()
    if is_dist():
        dist.barrier()
    return str(png) if png else None


def run_cli(run: Callable[[], dict], summary_path: str | None) -> int:
    """Run a trainer from its command line: the summary JSON (rank 0) and the process group torn down."""
    try:
        summary = run()
        if summary_path and rank() == 0:
            Path(summary_path).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    finally:
        if is_dist():
            dist.destroy_process_group()
    return 0
