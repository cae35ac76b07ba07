"""Prefect flow for the pretrain stage: one task that trains (in-process, or under torchrun when nproc > 1)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.caching import run_stage, stage_cache_key
from flows.reporting import TrainingProgress, image_artifact, stage_table
from lvdflow.stage import work_dir_of
from pretrain.config import load_config, profile_path
from pretrain.launch import Launch
from pretrain.run_pretrain import run_pretrain


@task(name="pretrain", cache_key_fn=stage_cache_key, persist_result=True)
def pretrain_task(shards: str, out: str, config: str = "demo", overrides: dict | None = None,
                  eval_train: str | None = None, eval_test: str | None = None, nproc: int = 1, nnodes: int = 1,
                  rdzv_endpoint: str | None = None, launcher: list[str] | None = None) -> dict:
    # No task retries: a failed run resumes from its checkpoint when the flow is run again.
    total = load_config(profile_path(config), overrides).total_iters
    launch = Launch(nproc=nproc, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint, prefix=list(launcher or []))
    log = get_run_logger()
    metrics = [work_dir_of(out) / "metrics.jsonl", Path(out) / "metrics.jsonl"]
    with TrainingProgress(metrics, total, f"pretraining {Path(config).stem} ({total} iterations)"):
        return run_pretrain(shards, out, config=config, overrides=overrides, eval_train=eval_train,
                            eval_test=eval_test, launch=launch, on_output=log.info)


@flow(name="pretrain", log_prints=True)
def pretrain_flow(shards: str, out: str, config: str = "demo", overrides: dict | None = None,
                  eval_train: str | None = None, eval_test: str | None = None, nproc: int = 1, nnodes: int = 1,
                  rdzv_endpoint: str | None = None, launcher: list[str] | None = None,
                  refresh: list[str] | None = None) -> dict:
    """DINOv2 pretraining on WebDataset shards; the teacher is exported and evaluated with kNN.
    `nproc` > 1 or `nnodes` > 1 trains under torchrun (FSDP2), its output streamed into this flow run's
    logs; `launcher` prefixes the torchrun command (e.g. srun) to start it on every node."""
    # The profile's file path, not its name, goes into the cache key, so an edited profile is a new run.
    manifest = run_stage(pretrain_task, out=out, refresh=refresh, shards=str(shards),
                         config=str(profile_path(config)), overrides=overrides or {}, eval_train=eval_train,
                         eval_test=eval_test, nproc=nproc, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint,
                         launcher=list(launcher or []))
    extra = {}
    for name in ("knn", "knn_random_init"):
        for k, v in (manifest.get(name) or {}).items():
            extra[f"{name}: {k}"] = round(v, 2)
    for k, v in (manifest.get("final") or {}).items():
        if v is not None:
            extra[f"final {k}"] = round(v, 4)
    get_run_logger().info("pretrain: %s iterations, kNN %s (random init %s)", manifest.get("counts", {}).get("iterations"),
                          manifest.get("knn"), manifest.get("knn_random_init"))
    stage_table("pretrain", manifest, extra)
    curves = manifest.get("outputs", {}).get("curves")
    if curves:
        image_artifact("pretrain-curves", Path(manifest["dir"]) / curves, "Pretraining curves",
                       "losses, collapse signals and kNN over iterations")
    return manifest
