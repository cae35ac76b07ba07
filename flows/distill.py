"""Prefect flow for the distill stage (a frozen pretrained teacher into one or several smaller ViTs)."""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from flows.caching import run_stage, stage_cache_key
from flows.reporting import stage_table
from pretrain.config import profile_path
from pretrain.launch import Launch
from pretrain.distill.stage import run_distill


@task(name="distill", cache_key_fn=stage_cache_key, persist_result=True)
def distill_task(teacher: str, shards: str, out: str, config: str, overrides: dict | None = None,
                 eval_train: str | None = None, eval_test: str | None = None, nproc: int = 1, nnodes: int = 1,
                 rdzv_endpoint: str | None = None, launcher: list[str] | None = None) -> dict:
    # No retries: a failed run resumes from its last checkpoint on the next call anyway.
    launch = Launch(nproc=nproc, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint, prefix=list(launcher or []))
    return run_distill(teacher, shards, out, config=config, overrides=overrides, eval_train=eval_train,
                       eval_test=eval_test, launch=launch, on_output=get_run_logger().info)


@flow(name="distill", log_prints=True)
def distill_flow(teacher: str, shards: str, out: str, config: str = "distill_demo", overrides: dict | None = None,
                 eval_train: str | None = None, eval_test: str | None = None, nproc: int = 1, nnodes: int = 1,
                 rdzv_endpoint: str | None = None, launcher: list[str] | None = None,
                 refresh: list[str] | None = None) -> dict:
    """Distil a pretraining run's teacher (with its heads) into the config's students; export each EMA.
    `nproc` > 1 or `nnodes` > 1 runs it under torchrun (FSDP2), its output streamed into this flow run."""
    # The profile's file path, not its name, goes into the cache key, so an edited profile is a new run.
    result = run_stage(distill_task, out=out, refresh=refresh, teacher=str(teacher), shards=str(shards),
                       config=str(profile_path(config)), overrides=dict(overrides or {}),
                       eval_train=str(eval_train) if eval_train else None,
                       eval_test=str(eval_test) if eval_test else None, nproc=nproc, nnodes=nnodes,
                       rdzv_endpoint=rdzv_endpoint, launcher=list(launcher or []))
    knn = {f"{name}: kNN top-1 (k=20)": s["knn"]["knn_top1_k20"]
           for name, s in result["students"].items() if s.get("knn")}
    get_run_logger().info("distill: %d iterations, students %s, %s", result["counts"]["iterations"],
                          ", ".join(result["students"]), knn)
    stage_table("distill", result, extra=knn)
    return result
