"""The distill stage: `run_distill(teacher, shards, out, ...)` -> manifest (docs/architecture.md).

Training runs inside `<out>.partial`, which keeps its checkpoints across crashes, so a rerun after a kill
resumes where the run stopped; the directory is published when every student is exported. The digest
covers the exported students (what a downstream stage would read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from lvdflow.stage import dir_digest, publish, work_dir
from pretrain.config import profile_path
from pretrain.distill.config import load_distill_config
from pretrain.launch import Launch, train_under_torchrun


def run_distill(teacher: str | Path, shards: str | Path, out: str | Path, *, config: str | Path = "distill_demo",
                overrides: dict[str, Any] | None = None, eval_train: str | Path | None = None,
                eval_test: str | Path | None = None, launch: Launch | None = None,
                on_output: Callable[[str], None] | None = None) -> dict:
    """Distil into `out`. `launch` (pretrain/launch.py) runs it under torchrun on one or several nodes;
    `on_output` gets torchrun's output lines."""
    cfg = load_distill_config(profile_path(str(config)), overrides)
    out = Path(out)
    work = work_dir(out)
    if launch is not None and launch.distributed:
        summary = train_under_torchrun("pretrain.distill.train", cfg, work, shards, eval_train, eval_test, launch,
                                       on_output, extra_args=["--teacher", str(teacher)])
    else:
        from pretrain.distill.train import distill

        summary = distill(cfg, work, teacher=teacher, shards=shards, eval_train=eval_train, eval_test=eval_test)
    students = {}
    for name, s in summary["students"].items():
        # Paths as they will be once published (the work directory is renamed to `out`).
        students[name] = {"backbone": str(out.resolve() / "students" / name / "student_backbone.pth"),
                          "official": str(out.resolve() / "students" / name / "student_official.pth"),
                          "params": s["params"], "knn": s.get("knn")}
    manifest = {
        "stage": "distill",
        "params": {"teacher": str(teacher), "shards": str(shards), "config": str(config),
                   "overrides": dict(overrides or {}), "masking": cfg.masking,
                   "nproc": launch.nproc if launch else 1, "nnodes": launch.nnodes if launch else 1},
        "counts": {"iterations": summary["iterations_done"], "students": len(students),
                   "global_batch": summary["global_batch"], "teacher_forwards": summary["teacher_forwards"]},
        "teacher": summary["teacher"],
        "students": students,
        "digest": dir_digest(work / "students"),
    }
    return publish(work, out, manifest)
