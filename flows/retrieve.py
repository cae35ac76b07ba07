"""Prefect flow for the retrieval stage (curated queries pull their neighbours out of the pool)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task

from curation.retrieve import run_retrieve
from flows.caching import STAGE_RETRIES, run_stage, stage_cache_key
from flows.reporting import markdown_report, stage_table
from flows.runners import RunnerConfig, unit_executor


@task(name="retrieve", cache_key_fn=stage_cache_key, persist_result=True, **STAGE_RETRIES)
def retrieve_task(pool_embeddings: str, query_embeddings: list[str] | None, pool_manifest: str, out: str,
                  params: dict | None = None, query_manifests: list[str] | None = None,
                  runner: dict | None = None) -> dict:
    # `params` carries run_retrieve's keyword options; the cache key includes them.
    with unit_executor(RunnerConfig.model_validate(runner or {}), "retrieve") as map_units:
        return run_retrieve(pool_embeddings, query_embeddings, pool_manifest, out, query_manifests=query_manifests,
                            map_units=map_units, **(params or {}))


@flow(name="retrieve", log_prints=True)
def retrieve_flow(pool_embeddings: str, query_embeddings: list[str] | None, pool_manifest: str, out: str,
                  params: dict | None = None, query_manifests: list[str] | None = None,
                  runner: RunnerConfig | None = None, refresh: list[str] | None = None) -> dict:
    """Retrieve pool images for each query set (sample-based kNN or cluster-based k-means; see
    curation.retrieve) and write retrieved.parquet plus a curation report with image grids.
    `runner` runs the kNN search of sample-mode query sets as tasks on threads, processes, Dask or Ray."""
    result = run_stage(retrieve_task, out=out, refresh=refresh, pool_embeddings=str(pool_embeddings),
                       query_embeddings=[str(q) for q in query_embeddings] if query_embeddings else None,
                       pool_manifest=str(pool_manifest), params=dict(params or {}),
                       query_manifests=[str(q) for q in query_manifests] if query_manifests else None,
                       runner=runner.model_dump() if runner else None)
    c = result["counts"]
    get_run_logger().info("retrieve: %d images from a pool of %d for %d queries (%d collisions)",
                          c["retrieved"], c["pool"], c["queries"], c["collisions"])
    stage_table("retrieve", result, extra={f"{name}: mode": s["mode"] for name, s in result["query_sets"].items()})
    # Grids of the biggest clusters and of a few queries' neighbours, shown inline in the UI.
    markdown_report("retrieve-report", Path(result["dir"]) / "report" / "report.md", "curation report")
    return result
