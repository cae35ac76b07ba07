"""Prefect flow for evaluation: kNN (and optionally linear) top-1 of backbones on labelled ImageFolders."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from flows.caching import run_stage, stage_cache_key
from lvdflow.stage import publish, work_dir
from pretrain.evaluate import evaluate_checkpoint


@task(name="evaluate", cache_key_fn=stage_cache_key, persist_result=True)
def evaluate_task(checkpoints: dict[str, str], train: str, test: str, out: str, kinds: list[str],
                  image_size: int | None = None) -> dict:
    work = work_dir(Path(out), fresh=True)
    results = {name: {kind: evaluate_checkpoint(ckpt, train, test, kind, image_size) for kind in kinds}
               for name, ckpt in checkpoints.items()}
    (work / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return publish(work, Path(out), {"stage": "evaluate", "results": results,
                                     "counts": {"models": len(checkpoints)}})


@flow(name="evaluate", log_prints=True)
def evaluate_flow(checkpoints: dict[str, str], train: str, test: str, out: str, kinds: list[str] | None = None,
                  image_size: int | None = None, refresh: list[str] | None = None) -> dict:
    """Evaluate each named backbone checkpoint; one table row per model and metric.

    `image_size` None: each checkpoint at its own evaluation size (`pretrain.evaluate.default_image_size`:
    the size this project's exports saved, else 224 or a smaller grid), not at its position-embedding grid."""
    manifest = run_stage(evaluate_task, out=out, refresh=refresh, checkpoints=dict(checkpoints), train=str(train),
                         test=str(test), kinds=list(kinds or ["knn"]), image_size=image_size)
    rows = []
    for name, by_kind in manifest["results"].items():
        for kind, res in by_kind.items():
            for metric, value in res.items():
                if "top1" in metric:
                    rows.append({"model": name, "eval": kind, "metric": metric, "top1": round(value, 2)})
    create_table_artifact(key="evaluate-summary", table=rows, description="top-1 accuracy of each model")
    get_run_logger().info("evaluate: %s", rows)
    return manifest
