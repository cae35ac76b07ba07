"""The distillation loop: the pretraining trainer's data, schedules, FSDP2 and checkpoints, with a frozen
teacher and one or several students.

    python -m pretrain.distill.train --teacher RUN_OR_CKPT --config distill_demo --shards SHARDS --out OUT
    torchrun --nproc-per-node 2 -m pretrain.distill.train ...                     # FSDP2, CPU (gloo) or CUDA

Pieces shared with pretrain/train.py are imported from it (process group and device, shard stream, crops,
FSDP2 sharding of a student and its EMA) and the loop itself is pretrain/loop.py's, as for pretraining:
this module builds the teacher, the students and their optimizer, says how one step runs (the unmasked
batch, clipping per student, the students' EMAs) and what is exported. Checkpoints are pretrain/checkpointing.py's
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
import json
from dataclasses import replace
from pathlib import Path

import torch

from lvdflow.errors import UserError
from pretrain.checkpointing import full_state_dict
from pretrain.data import BatchStream, data_workers
from pretrain.distill.config import DistillConfig
from pretrain.distill.meta_arch import DistillMetaArch, unmasked_ibot_batch
from pretrain.distill.teacher import load_teacher, saved_centers
from pretrain.distributed import is_dist, rank, world_size
from pretrain.loop import (LoopSpec, build_optimizer, eval_device, finish, knn_eval, lr_and_schedules, resume,
                           run_cli, run_loop)
from pretrain.param_groups import param_groups
from pretrain.train import (build_augmentation, build_backbone, compile_for_training, init_distributed, open_shard_stream,
                            shard_with_fsdp2)


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
    from pretrain.models.checkpoint import EVAL_IMAGE_SIZE_KEY, export_official, save_backbone

    backbones = {}
    for spec in cfg.student_specs():
        sd = full_state_dict(meta.students[spec["name"]].ema)
        if rank() != 0:
            continue
        backbone = build_backbone(student_config(cfg, spec), drop_path_rate=0.0)
        backbone.load_state_dict({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")})
        d = dest / spec["name"]
        d.mkdir(parents=True, exist_ok=True)
        save_backbone(backbone, d / "student_backbone.pth",
                      extra={"iteration": iteration, "arch": spec["arch"],
                             EVAL_IMAGE_SIZE_KEY: cfg.eval_image_size or cfg.global_crops_size})
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
    if cfg.compile:
        compile_for_training(meta)
    if is_dist():
        for student in meta.students.values():
            shard_with_fsdp2(student, device)
        shard_teacher_with_fsdp2(meta.teacher, device)
    torch.manual_seed(cfg.seed + 1000 * rank())  # per-rank draws (stochastic depth, when a profile turns it on)
    optimizer = build_optimizer([g for st in meta.students.values()
                                 for g in param_groups(st.student, num_layers=len(st.student["backbone"].blocks),
                                                       layer_decay=cfg.layer_decay,
                                                       patch_embed_lr_mult=cfg.patch_embed_lr_mult)], cfg)
    global_batch = cfg.batch_size_per_rank * world_size()
    lr, sched = lr_and_schedules(cfg, global_batch)

    if dataset is None:
        if shards is None:
            raise ValueError("distill() needs shards or a dataset")
        dataset = open_shard_stream(shards, cfg)
    workers = data_workers(cfg.data_workers)
    stream = BatchStream(dataset, batch_size=cfg.batch_size_per_rank, seed=cfg.seed, rank=rank(), workers=workers,
                         mask_probability=cfg.mask_probability if cfg.masking else 0.0,
                         mask_ratio=(cfg.mask_ratio_min, cfg.mask_ratio_max))
    start = resume(out / "checkpoints", meta.checkpointed(), optimizer, stream,
                   check=lambda ckpt: _check_same_students(ckpt, cfg))

    def export(dest: Path, iteration: int) -> dict:
        return {f"{name}/": bb for name, bb in export_students(meta, cfg, dest, iteration).items()}

    spec = LoopSpec(model=meta, checkpointed=meta.checkpointed(), optimizer=optimizer, sched=sched, stream=stream,
                    # per student and submodule, as DINOv2 per submodule
                    clip_modules=[st.student[name] for st in meta.students.values() for name in st.student.keys()],
                    update_ema=meta.update_emas, export=export,
                    checkpoint_config={**cfg.to_dict(), "teacher": teacher_info["path"]},
                    build_augmentation=lambda highres: build_augmentation(cfg, highres),
                    prepare_batch=None if cfg.masking else (lambda b: unmasked_ibot_batch(b, cfg.patch_size)),
                    on_first_step=lambda reduced: _warn_if_uniform_targets(reduced, teacher_info),
                    what="distillation loss")
    log, last_record, stop = run_loop(cfg, out, spec, device=device, start=start, global_batch=global_batch,
                                      eval_train=eval_train, eval_test=eval_test)

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
                entry["knn"] = knn_eval(bb, cfg, eval_train, eval_test, eval_device(device))
                log.log({"iteration": cfg.total_iters - 1, **{f"{name}/{k}": v for k, v in entry["knn"].items()}})
            summary["students"][name] = entry
    curves = finish(log, out)
    if rank() == 0:
        summary["curves"] = curves
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
    return run_cli(lambda: distill(cfg, args.out, teacher=args.teacher, shards=args.shards,
                                   eval_train=args.eval_train, eval_test=args.eval_test), args.summary)


if __name__ == "__main__":
    raise SystemExit(main())
