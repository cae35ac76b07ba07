"""Prefect flow for the dedup stage (exact duplicates, copy detection, decontamination, hygiene)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task

from curation.dedup.stage import candidates_dir_for, decide_dedup, find_candidates, split_params
from flows.caching import STAGE_RETRIES, run_stage, stage_cache_key
from flows.reporting import markdown_report, stage_table
from flows.runners import RunnerConfig, unit_executor


@task(name="dedup-candidates", cache_key_fn=stage_cache_key, persist_result=True, **STAGE_RETRIES)
def dedup_candidates_task(input: str, out: str, references: list[str] | None = None, weights: str | None = None,
                          params: dict | None = None, runner: dict | None = None) -> dict:
    # Paths are separate arguments so the cache key fingerprints their contents; `params` holds the rest.
    with unit_executor(RunnerConfig.model_validate(runner or {}), "dedup") as map_units:
        return find_candidates(input, out, references=references or (), weights=weights, map_units=map_units,
                               **(params or {}))


@task(name="dedup", cache_key_fn=stage_cache_key, persist_result=True, **STAGE_RETRIES)
def dedup_task(candidates: str, out: str, params: dict | None = None) -> dict:
    return decide_dedup(candidates, out, **(params or {}))


@flow(name="dedup", log_prints=True)
def dedup_flow(input: str, out: str, references: list[str] | None = None, weights: str | None = None,
               params: dict | None = None, runner: RunnerConfig | None = None,
               refresh: list[str] | None = None, candidates: str | None = None) -> dict:
    """Find exact duplicates and copies (kNN + threshold + components), keep one image per component,
    drop components that copy a reference image, optionally quarantine NSFW images and record faces.
    Two cached tasks: `dedup-candidates` (descriptors, kNN, scored pairs; into `candidates`, by default
    `<out>-candidates`) and `dedup` (thresholds and the rest), so a changed threshold reruns only the second.
    `runner` decodes and describes the images as tasks on threads, processes, Dask or Ray."""
    candidate_params, decision_params = split_params(dict(params or {}))
    refresh = list(refresh or [])
    if "dedup" in refresh:  # "redo dedup" means both halves
        refresh.append("dedup-candidates")
    cand = run_stage(dedup_candidates_task, out=str(candidates or candidates_dir_for(out)), refresh=refresh,
                     input=str(input), references=[str(r) for r in references or []] or None,
                     weights=str(weights) if weights else None, params=candidate_params,
                     runner=runner.model_dump() if runner else None)
    c = cand["counts"]
    get_run_logger().info("dedup-candidates: %d images described in %.1f s, %d candidate pairs scored",
                          c["images"] + c["reference_images"], cand["seconds"]["total"], c["candidate_pairs"])
    stage_table("dedup-candidates", cand)
    result = run_stage(dedup_task, out=out, refresh=refresh, candidates=cand["dir"], params=decision_params)
    c = result["counts"]
    get_run_logger().info("dedup: %d of %d images kept, %d removed", c["kept"], c["images"], c["removed"])
    stage_table("dedup", result)
    # Grids of the largest duplicate groups and of reference copies, shown inline in the UI.
    markdown_report("dedup-report", Path(result["dir"]) / "report.md", "dedup report: what was removed and why")
    return result
