"""The distillation loop: the pretraining trainer's data, schedules, FSDP2 and checkpoints, with a frozen
teacher and one or several students.

    python -m pretrain.distill.train --teacher RUN_OR_CKPT --config distill_demo --shards SHARDS --out OUT
    torchrun --nproc-per-node 2 -m pretrain.distill.train ...                     # FSDP2, CPU (gloo) or CUDA

Pieces shared with pretrain/train.py are imported from it: process group and device, shard stream, crops,
FSDP2 sharding of a student (and its EMA), metric reduction, kNN. Checkpoints are pretrain/checkpointing.py's
(DCP, any process count on resume; RNG and data position per rank), holding the students, their EMAs and
optimizer state and the target centres, not the teacher (reloaded from its file). A run killed and
resumed reproduces the uninterrupted run's losses (bitwise on CPU in one process).

Outputs under OUT: `students/<name>/student_backbone.pth` (this project's format, read by `load_backbone`
and `lvdflow eval`), `student_official.pth` (bare DINOv2 hub layout), `student_checkpoint.pth` (the EMA with
heads, `{"teacher": ...}`, so a distilled student can teach in turn); the EMA of the student is what is
exported (the paper's final model). Also metrics.jsonl, curves.png, TensorBoard, checkpoints/.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from lvdflow.errors import UserError
from pretrain.checkpointing import full_state_dict, latest_checkpoint, load_checkpoint, save_checkpoint
from pretrain.data import BatchStream
from pretrain.distill.config import DistillConfig
from pretrain.distill.meta_arch import DistillMetaArch, unmasked_ibot_batch
from pretrain.distill.teacher import load_teacher, saved_centers
from pretrain.distributed import is_dist, rank, world_size
from pretrain.meta_arch import TrainingDiverged
from pretrain.metrics_log import MetricsLog, plot_curves
from pretrain.param_groups import apply_schedules, param_groups
from pretrain.schedules import build_schedules, scaled_lr
from pretrain.train import (_knn, _reduce_metrics, _to_device, build_augmentation, build_backbone, init_distributed,
                            open_shard_stream, shard_with_fsdp2)


# ---- construction ------------------------------------------------------------------------------------
def student_config(cfg: DistillConfig, spec: dict) -> DistillConfig:
    """The config whose backbone fields describe one student (the trainer's build_backbone reads them)."""
    return replace(cfg, arch=spec["arch"], **{k: spec["overrides"].get(k, 0) for k in ("embed_dim", "depth", "num_heads")})


def build_distill(cfg: DistillConfig, teacher_path: str | Path) -> tuple[DistillMetaArch, dict]:
    teacher, info = load_teacher(teacher_path, head_hidden_dim=cfg.head_hidden_dim,
                                 head_bottleneck_dim=cfg.head_bottleneck_dim, head_nlayers=cfg.head_nlayers,
                                 dino_prototypes=cfg.dino_prototypes, seed=cfg.seed, heads=cfg.teacher_heads)
    torch.manual_seed(cfg.seed)  # same student initialisation on every rank and every resume
    students = {s["name"]: build_backbone(student_config(cfg, s)) for s in cfg.student_specs()}
    meta = DistillMetaArch(teacher, students, dino_weight=cfg.dino_weight, ibot_weight=cfg.ibot_weight,
                           koleo_weight=cfg.koleo_weight, centering=cfg.centering,
                           norm_last_layer=cfg.norm_last_layer, feature_weight=cfg.feature_weight)
    # A trained teacher's targets start centred as they were at the end of its pretraining (zeros would
    # give uncentred, prototype-biased targets until the EMA catches up); the EMA then follows this data.
    centers = saved_centers(teacher_path) if info["heads"] == "trained" and cfg.centering == "centering" else {}
    loaded = []
    for key, loss in (("dino", meta.dino_loss), ("ibot", meta.ibot_loss)):
        if key in centers and centers[key].shape == loss.center.shape:
            loss.center.copy_(centers[key])
            loaded.append(key)
    info = {**info, "centers": "saved" if loaded else "zeros"}
    if not cfg.masking:
        # Without masking the mask token is never used: frozen, it has no gradient and no optimizer state
        # (a parameter that never steps would have none, and the checkpoint would not match on resume).
        for student in meta.students.values():
            student.student["backbone"].mask_token.requires_grad_(False)
    return meta, info


def schedules(cfg: DistillConfig, global_batch: int):
    """The trainer's schedules; every build_schedules argument but `lr` is the config key of that name."""
    lr = scaled_lr(cfg.base_lr, global_batch) if cfg.lr_scaling == "sqrt_wrt_1024" else cfg.base_lr
    names = [n for n in inspect.signature(build_schedules).parameters if n != "lr"]
    return lr, build_schedules(lr=lr, **{n: getattr(cfg, n) for n in names})


def shard_teacher_with_fsdp2(teacher: torch.nn.Module, device: torch.device) -> None:
    """FSDP2 over the frozen teacher (blocks, then backbone and heads): a large teacher need not fit one
    device. Its parameters stay frozen; FSDP only gathers them for the forward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if device.type == "cuda" else MixedPrecisionPolicy()
    for blk in teacher["backbone"].blocks:
        fully_shard(blk, mesh=mesh, mp_policy=mp)
    for name in teacher.keys():
        fully_shard(teacher[name], mesh=mesh, mp_policy=mp)


# ---- exports -----------------------------------------------------------------------------------------
def export_students(meta: DistillMetaArch, cfg: DistillConfig, dest: Path, iteration: int) -> dict:
    """Collective. Rank 0 writes each student's EMA under dest/<name>/; returns {name: backbone} there."""
    from pretrain.models.checkpoint import export_official, save_backbone

    backbones = {}
    for spec in cfg.student_specs():
        sd = full_state_dict(meta.students[spec["name"]].ema)
        if rank() != 0:
            continue
        backbone = build_backbone(student_config(cfg, spec), drop_path_rate=0.0)
        backbone.load_state_dict({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")})
        d = dest / spec["name"]
        d.mkdir(parents=True, exist_ok=True)
        save_backbone(backbone, d / "student_backbone.pth", extra={"iteration": iteration, "arch": spec["arch"]})
        export_official(backbone, d / "student_official.pth")
        tmp = d / "student_checkpoint.pth.tmp"
        torch.save({"teacher": sd, "iteration": iteration}, tmp)
        tmp.replace(d / "student_checkpoint.pth")
        backbones[spec["name"]] = backbone.eval()
    return backbones


# ---- the loop ----------------------------------------------------------------------------------------
def _check_same_students(ckpt: Path, cfg: DistillConfig) -> None:
    saved = json.loads((ckpt / "state.json").read_text())["config"]
    before = DistillConfig(**{k: v for k, v in saved.items() if k != "teacher"}).student_specs()
    if before != cfg.student_specs():
        raise UserError(f"{ckpt.parent.parent} holds a distillation of other students ({before}); "
                        f"use another --out or the same students")


def _step(meta, optimizer, batch, s, cfg, last_layer, autocast, it):
    apply_schedules(optimizer, lr=s["lr"], last_layer_lr=s["last_layer_lr"], wd=s["wd"])
    with autocast:
        loss, metrics = meta(batch, s["teacher_temp"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if it < cfg.freeze_last_layer_iters:
        for p in last_layer:  # zeros, not None: the optimizer state stays complete (as the trainer)
            if p.grad is not None:
                p.grad.zero_()
    if cfg.clip_grad:
        for student in meta.students.values():
            for name in student.student.keys():  # per student and submodule, as DINOv2 per submodule
                torch.nn.utils.clip_grad_norm_(student.student[name].parameters(), cfg.clip_grad)
    optimizer.step()
    meta.update_emas(s["momentum"])
    return metrics


def _warn_if_uniform_targets(reduced: dict, teacher_info: dict) -> None:
    """A teacher head that collapsed to uniform outputs (entropy ~ log K) teaches nothing through DINO."""
    name = next(k.split("/")[0] for k in reduced if k.endswith("/teacher_entropy"))
    entropy, log_k = reduced[f"{name}/teacher_entropy"], reduced[f"{name}/log_prototypes"]
    if teacher_info["heads"] == "trained" and entropy > 0.98 * log_k:
        print(f"warning: the teacher's targets are almost uniform (entropy {entropy:.3f} of log K = {log_k:.3f}): "
              f"its DINO head has collapsed; teacher_heads: fresh distils its backbone through new heads", flush=True)


def distill(cfg: DistillConfig, out: str | Path, *, teacher: str | Path, shards: str | Path | None = None,
            dataset=None, eval_train: str | Path | None = None, eval_test: str | Path | None = None) -> dict:
    """Distil (or resume distilling) `teacher` into cfg's students, into `out`. Returns rank 0's summary."""
    cfg.validate()
    out = Path(out)
    device = init_distributed()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    meta, teacher_info = build_distill(cfg, teacher)
    meta = meta.to(device)
    if rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({**cfg.to_dict(), "teacher": teacher_info}, indent=2,
                                                    sort_keys=True) + "\n")
    if is_dist():
        for student in meta.students.values():
            shard_with_fsdp2(student, device)
        shard_teacher_with_fsdp2(meta.teacher, device)
    torch.manual_seed(cfg.seed + 1000 * rank())  # per-rank draws (stochastic depth, when a profile turns it on)
    groups = [g for st in meta.students.values()
              for g in param_groups(st.student, num_layers=len(st.student["backbone"].blocks),
                                    layer_decay=cfg.layer_decay, patch_embed_lr_mult=cfg.patch_embed_lr_mult)]
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups],
                                  betas=tuple(cfg.adamw_betas))
    global_batch = cfg.batch_size_per_rank * world_size()
    lr, sched = schedules(cfg, global_batch)

    if dataset is None:
        if shards is None:
            raise ValueError("distill() needs shards or a dataset")
        dataset = open_shard_stream(shards, cfg)
    stream = BatchStream(dataset, batch_size=cfg.batch_size_per_rank, seed=cfg.seed, rank=rank(),
                         mask_probability=cfg.mask_probability if cfg.masking else 0.0,
                         mask_ratio=(cfg.mask_ratio_min, cfg.mask_ratio_max))

    ckroot, start = out / "checkpoints", 0
    ckpt = latest_checkpoint(ckroot)
    if ckpt is not None:
        _check_same_students(ckpt, cfg)
        info = load_checkpoint(ckpt, meta.checkpointed(), optimizer)
        start = info["iteration"]
        if info["data"] is not None:
            stream.load_state_dict(info["data"])
        elif "epoch" in (info.get("data_rank0") or {}):
            stream.start_after_epoch(info["data_rank0"]["epoch"])  # another process count: next epoch
    log = MetricsLog(out, start, enabled=rank() == 0)
    last_layer = [p for n, p in meta.students.named_parameters() if "last_layer" in n and p.requires_grad]
    stop = min(cfg.stop_after or cfg.total_iters, cfg.total_iters)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    augs = {}
    highres_from = cfg.total_iters - cfg.highres_iters if cfg.highres_iters else cfg.total_iters + 1
    eval_device = "cpu" if device.type == "cpu" else device
    last_record: dict = {}
    t_last, n_since = time.perf_counter(), 0
    meta.train()
    for it in range(start, stop):
        highres = it >= highres_from
        if highres not in augs:
            augs[highres] = build_augmentation(cfg, highres)
        batch = _to_device(stream.next_batch(it, augs[highres], cfg.patch_size), device)
        if not cfg.masking:
            batch = unmasked_ibot_batch(batch, cfg.patch_size)
        s = sched.at(it)
        metrics = _step(meta, optimizer, batch, s, cfg, last_layer, autocast, it)
        n_since += 1
        reduced = _reduce_metrics(metrics, device)
        if not math.isfinite(reduced["total_loss"]):
            raise TrainingDiverged(f"non-finite distillation loss at iteration {it} "
                                   f"({ {k: v for k, v in reduced.items() if k.endswith('loss')} }); "
                                   f"the last checkpoint is in {ckroot}")
        if it == start and rank() == 0:
            _warn_if_uniform_targets(reduced, teacher_info)
        done = it + 1
        if it == start or done % cfg.log_every == 0 or done == stop:
            now = time.perf_counter()
            last_record = {"iteration": it, **reduced, **s, "images_per_s": n_since * global_batch / max(now - t_last, 1e-9)}
            t_last, n_since = now, 0
            log.log(last_record)
            if rank() == 0:
                print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in last_record.items()}),
                      flush=True)
        if done % cfg.checkpoint_every == 0 or done == stop:
            save_checkpoint(ckroot, done, meta.checkpointed(), optimizer, stream.state_dict(),
                            {**cfg.to_dict(), "teacher": teacher_info["path"]}, cfg.keep_checkpoints)
        want_eval = bool(cfg.eval_every and eval_train and eval_test and done % cfg.eval_every == 0 and done < stop)
        if (cfg.export_every and done % cfg.export_every == 0) or want_eval:
            backbones = export_students(meta, cfg, out / "exports" / f"it_{done:08d}", done)
            for name, bb in backbones.items() if want_eval else ():
                log.log({"iteration": it, **{f"{name}/{k}": v for k, v in _knn(bb, cfg, eval_train, eval_test,
                                                                               eval_device).items()}})
            if is_dist():
                dist.barrier()

    summary = {"iterations_done": stop, "total_iters": cfg.total_iters, "world_size": world_size(),
               "global_batch": global_batch, "lr": lr, "last": last_record, "resumed_from": start,
               "teacher": teacher_info, "teacher_forwards": meta.teacher_forwards, "masking": cfg.masking,
               "students": {}}
    if stop == cfg.total_iters:
        backbones = export_students(meta, cfg, out / "students", cfg.total_iters)
        for name, bb in backbones.items():
            entry = {"arch": bb.config.to_dict(), "params": sum(p.numel() for p in bb.parameters()),
                     "backbone": str(out / "students" / name / "student_backbone.pth"),
                     "official": str(out / "students" / name / "student_official.pth")}
            if eval_train and eval_test:
                entry["knn"] = _knn(bb, cfg, eval_train, eval_test, eval_device)
                log.log({"iteration": cfg.total_iters - 1, **{f"{name}/{k}": v for k, v in entry["knn"].items()}})
            summary["students"][name] = entry
    if rank() == 0:
        png = plot_curves(log.path, out / "curves.png")
        summary["curves"] = str(png) if png else None
    log.close()
    if is_dist():
        dist.barrier()
    return summary


def main(argv: list[str] | None = None) -> int:
    from pretrain.config import profile_path
    from pretrain.distill.config import load_distill_config

    ap = argparse.ArgumentParser(description="DINOv2 distillation (one process, or one per torchrun rank)")
    ap.add_argument("--teacher", required=True, help="pretraining run directory, teacher checkpoint or backbone")
    ap.add_argument("--config", default="distill_demo", help="profile name or YAML/JSON file")
    ap.add_argument("--arch", help="students, comma-separated (e.g. vit_tiny,vit_small); default: the profile's")
    ap.add_argument("--shards", required=True, help="folder of WebDataset shards")
    ap.add_argument("--out", required=True, help="run directory (resumed when it holds a checkpoint)")
    ap.add_argument("--eval-train")
    ap.add_argument("--eval-test")
    ap.add_argument("--summary", help="write the summary JSON here (rank 0)")
    args = ap.parse_args(argv)
    overrides = {"students": args.arch.split(",")} if args.arch else {}
    cfg = load_distill_config(profile_path(args.config), overrides)
    try:
        summary = distill(cfg, args.out, teacher=args.teacher, shards=args.shards, eval_train=args.eval_train,
                          eval_test=args.eval_test)
        if args.summary and rank() == 0:
            Path(args.summary).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    finally:
        if is_dist():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
