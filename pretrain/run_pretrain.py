"""The `pretrain` stage: train on WebDataset shards into an output directory, resumably.

`run_pretrain(shards, out, config=...)` builds everything in `<out>.partial` (checkpoints included, so a
killed run continues from its last checkpoint when called again), runs the trainer in this process or,
with `nproc > 1` or several nodes, under `torchrun` (pretrain/launch.py; FSDP2, one process per rank), evaluates the teacher
and the same architecture at random initialisation with kNN when evaluation folders are given, and
publishes the directory with its manifest.

Output: `teacher/teacher_backbone.pth` (load with `pretrain.models.checkpoint.load_backbone`),
`teacher/teacher_official.pth` (DINOv2 hub layout), `teacher/teacher_checkpoint.pth` (teacher with heads),
`checkpoints/` (DCP), `metrics.jsonl`, `tensorboard/`, `curves.png`, `config.json`, `summary.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from lvdflow.errors import UserError
from lvdflow.stage import file_digest, publish, work_dir
from pretrain.config import load_config, profile_path
from pretrain.launch import Launch, train_under_torchrun


def random_init_knn(cfg, eval_train, eval_test) -> dict:
    """kNN of the architecture as the trainer initialises it (same seed): the baseline training must beat."""
    from pretrain.evaluate import evaluate_backbone
    from pretrain.train import build_meta_arch

    torch.manual_seed(cfg.seed)
    backbone = build_meta_arch(cfg).teacher["backbone"]
    res = evaluate_backbone(backbone, eval_train, eval_test, "knn", image_size=cfg.eval_image_size or cfg.global_crops_size)
    return {k: v for k, v in res.items() if k.startswith("knn_top1")}


def run_pretrain(shards: str | os.PathLike, out: str | os.PathLike, *, config: str = "demo",
                 overrides: dict[str, Any] | None = None, eval_train: str | os.PathLike | None = None,
                 eval_test: str | os.PathLike | None = None, nproc: int = 1, baseline: bool = True,
                 launch: Launch | None = None, on_output: Callable[[str], None] | None = None) -> dict:
    """Train into `out` (see the module docstring). `launch` (pretrain/launch.py) runs the trainer under
    torchrun on one or several nodes, `nproc` alone on this node; `on_output` gets torchrun's output lines."""
    shards, out = Path(shards), Path(out)
    if not shards.is_dir():
        raise UserError(f"shard folder does not exist: {shards}")
    if (eval_train is None) != (eval_test is None):
        raise UserError("give both eval_train and eval_test, or neither")
    launch = launch or Launch(nproc=nproc)
    launch.check()
    cfg = load_config(profile_path(config), overrides)
    work = work_dir(out)
    cfg_path = work / "config.requested.json"
    cfg_path.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    if launch.distributed:
        summary = train_under_torchrun("pretrain.train", cfg, work, shards, eval_train, eval_test, launch, on_output)
    else:
        from pretrain.train import train

        summary = train(cfg, work, shards=shards, eval_train=eval_train, eval_test=eval_test)
        (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if baseline and eval_train and eval_test:
        summary["knn_random_init"] = random_init_knn(cfg, eval_train, eval_test)
        (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if summary["iterations_done"] < cfg.total_iters:  # stopped early on purpose (stop_after): not published
        return {"stage": "pretrain", "complete": False, "dir": str(work), "iterations_done": summary["iterations_done"],
                "total_iters": cfg.total_iters}
    teacher = work / "teacher" / "teacher_backbone.pth"
    last = summary.get("last", {})
    manifest = {
        "stage": "pretrain",
        "params": {"config": str(config), "overrides": overrides or {}, "nproc": launch.nproc,
                   "nnodes": launch.nnodes, "shards": str(shards.resolve())},
        "counts": {"iterations": summary["iterations_done"], "global_batch": summary["global_batch"],
                   "images_seen": summary["iterations_done"] * summary["global_batch"]},
        "final": {k: last.get(k) for k in ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss",
                                           "ibot_loss", "koleo_loss", "teacher_entropy", "teacher_student_kl")},
        "knn": summary.get("knn"),
        "knn_random_init": summary.get("knn_random_init"),
        "outputs": {"teacher": "teacher/teacher_backbone.pth", "teacher_official": "teacher/teacher_official.pth",
                    "teacher_with_heads": "teacher/teacher_checkpoint.pth", "checkpoints": "checkpoints",
                    "metrics": "metrics.jsonl", "curves": "curves.png", "tensorboard": "tensorboard"},
        "digest": file_digest(teacher) if teacher.is_file() else None,
    }
    return publish(work, out, manifest)
