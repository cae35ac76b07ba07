"""Prefect flow for the ingest stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.context import TaskRunContext

from curation.decode import DEFAULT_MAX_PIXELS
from curation.ingest import BATCH, run_ingest
from curation.sources import LIST_SUFFIXES, listed_files_fingerprint
from flows.caching import STAGE_RETRIES, run_stage, stage_cache_key
from flows.reporting import stage_table
from flows.runners import RunnerConfig, unit_executor
from lvdflow.errors import UserError


def _listed(source: str) -> str | None:
    if not (source.lower().endswith(LIST_SUFFIXES) and Path(source).is_file()):
        return None
    try:
        return listed_files_fingerprint(Path(source))
    except UserError:  # an unreadable list: the stage itself reports it
        return "unreadable"


def ingest_cache_key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
    """stage_cache_key, plus the files each list source names: an image replaced at a listed path leaves the
    list's own bytes (all that the generic key sees) unchanged."""
    listed = [_listed(str(s)) for s in params.get("sources") or ()]
    if any(listed):  # without list sources the key stays what it was
        params = {**params, "listed_files": listed}
    return stage_cache_key(ctx, params)


@task(name="ingest", cache_key_fn=ingest_cache_key, persist_result=True, **STAGE_RETRIES)
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
