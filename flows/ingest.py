"""Prefect flow for the ingest stage."""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from curation.decode import DEFAULT_MAX_PIXELS
from curation.ingest import BATCH, run_ingest
from flows.caching import STAGE_RETRIES, run_stage, stage_cache_key
from flows.reporting import stage_table
from flows.runners import RunnerConfig, unit_executor


@task(name="ingest", cache_key_fn=stage_cache_key, persist_result=True, **STAGE_RETRIES)
def ingest_task(sources: list[str], out: str, workers: int | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 16, batch_size: int = BATCH,
                runner: dict | None = None) -> dict:
    log = get_run_logger()
    step = [0]

    def progress(done: int) -> None:
        if done - step[0] >= 5000:
            step[0] = done
            log.info("ingest: %d inputs checked", done)

    with unit_executor(RunnerConfig.model_validate(runner or {}), "ingest") as map_units:
        return run_ingest(sources, out, workers=workers, max_pixels=max_pixels, min_side=min_side, progress=progress,
                          batch_size=batch_size, map_units=map_units)


@flow(name="ingest", log_prints=True)
def ingest_flow(sources: list[str], out: str, workers: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                min_side: int = 16, batch_size: int = BATCH, runner: RunnerConfig | None = None,
                refresh: list[str] | None = None) -> dict:
    """Read folders, tar shards and path lists; keep good images, quarantine the rest with reasons.
    `runner` checks the batches as tasks on threads, processes, Dask or Ray (default: a local process pool)."""
    manifest = run_stage(ingest_task, out=out, refresh=refresh, sources=[str(s) for s in sources],
                         workers=workers, max_pixels=max_pixels, min_side=min_side, batch_size=batch_size,
                         runner=runner.model_dump() if runner else None)
    c = manifest["counts"]
    get_run_logger().info("ingest: %d images kept, %d quarantined %s", c["images"], c["quarantined"],
                          manifest.get("quarantine_reasons", {}))
    stage_table("ingest", manifest)
    return manifest
