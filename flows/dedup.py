"""Prefect flow for the dedup stage (exact duplicates, copy detection, decontamination, hygiene)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task

from curation.dedup.stage import run_dedup
from flows.caching import STAGE_RETRIES, run_stage, stage_cache_key
from flows.reporting import markdown_report, stage_table
from flows.runners import RunnerConfig, unit_executor


@task(name="dedup", cache_key_fn=stage_cache_key, persist_result=True, **STAGE_RETRIES)
def dedup_task(input: str, out: str, references: list[str] | None = None, weights: str | None = None,
               params: dict | None = None, runner: dict | None = None) -> dict:
    # Paths are separate arguments so the cache key fingerprints their contents; `params` holds the rest.
    with unit_executor(RunnerConfig.model_validate(runner or {}), "dedup") as map_units:
        return run_dedup(input, out, references=references or (), weights=weights, map_units=map_units,
                         **(params or {}))


@flow(name="dedup", log_prints=True)
def dedup_flow(input: str, out: str, references: list[str] | None = None, weights: str | None = None,
               params: dict | None = None, runner: RunnerConfig | None = None,
               refresh: list[str] | None = None) -> dict:
    """Find exact duplicates and copies (kNN + threshold + components), keep one image per component,
    drop components that copy a reference image, optionally quarantine NSFW images and record faces.
    `runner` decodes and describes the images as tasks on threads, processes, Dask or Ray."""
    result = run_stage(dedup_task, out=out, refresh=refresh, input=str(input),
                       references=[str(r) for r in references or []] or None,
                       weights=str(weights) if weights else None, params=dict(params or {}),
                       runner=runner.model_dump() if runner else None)
    c = result["counts"]
    get_run_logger().info("dedup: %d of %d images kept, %d removed", c["kept"], c["images"], c["removed"])
    stage_table("dedup", result)
    # Grids of the largest duplicate groups and of reference copies, shown inline in the UI.
    markdown_report("dedup-report", Path(result["dir"]) / "report.md", "dedup report: what was removed and why")
    return result
