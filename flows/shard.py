"""Prefect flow for the shard stage (curated images as WebDataset tar shards)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.caching import STAGE_RETRIES, run_stage, stage_cache_key
from flows.reporting import stage_table
from flows.runners import RunnerConfig, unit_executor
from shards.writer import run_shard


@task(name="shard", cache_key_fn=stage_cache_key, persist_result=True, **STAGE_RETRIES)
def shard_task(source: str | list[str], out: str, max_count: int = 10_000, max_bytes: int = 1 << 30,
               workers: int = 1, shuffle_seed: int | None = 0, runner: dict | None = None) -> dict:
    # A retry (or a rerun after a crash) skips the shards already complete in <out>.partial.
    log = get_run_logger()
    with unit_executor(RunnerConfig.model_validate(runner or {}), "shard") as map_units:
        return run_shard(source, out, max_count=max_count, max_bytes=max_bytes, workers=workers,
                         shuffle_seed=shuffle_seed, map_units=map_units,
                         progress=lambda n: log.info("shard: %d shards done", n) if n % 10 == 0 else None)


@flow(name="shard", log_prints=True)
def shard_flow(source: str | list[str], out: str, max_count: int = 10_000, max_bytes: int = 1 << 30,
               workers: int = 1, shuffle_seed: int | None = 0, runner: RunnerConfig | None = None,
               refresh: list[str] | None = None) -> dict:
    """Write a retrieve output (or an ingest manifest, or several concatenated) as WebDataset shards with
    parquet indexes, the rows in `shuffle_seed`'s permutation (None: in input order).
    `runner` writes the shards as tasks on threads, processes, Dask or Ray (default: `workers` threads)."""
    sources = str(source) if isinstance(source, (str, Path)) else [str(s) for s in source]
    result = run_stage(shard_task, out=out, refresh=refresh, source=sources, max_count=max_count,
                       max_bytes=max_bytes, workers=workers, shuffle_seed=shuffle_seed,
                       runner=runner.model_dump() if runner else None)
    c = result["counts"]
    get_run_logger().info("shard: %d samples in %d shards (%d reused), %d errors %s", c["samples"], c["shards"],
                          c["shards_skipped"], c["errors"], result.get("error_reasons", {}))
    stage_table("shard", result, extra={f"error: {k}": v for k, v in result.get("error_reasons", {}).items()})
    return result
