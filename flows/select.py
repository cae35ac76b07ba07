"""Prefect flow for the select stage: the ingest manifest restricted to what dedup kept."""

from __future__ import annotations

from prefect import flow, task

from curation.select import run_select
from flows.caching import run_stage, stage_cache_key
from flows.reporting import stage_table


@task(name="select", cache_key_fn=stage_cache_key, persist_result=True)
def select_task(ingest_dir: str, dedup_dir: str, out: str) -> dict:
    return run_select(ingest_dir, dedup_dir, out)


@flow(name="select", log_prints=True)
def select_flow(ingest_dir: str, dedup_dir: str, out: str, refresh: list[str] | None = None) -> dict:
    """Keep the manifest rows dedup kept (with face boxes), for embedding and sharding."""
    manifest = run_stage(select_task, out=out, refresh=refresh, ingest_dir=str(ingest_dir), dedup_dir=str(dedup_dir))
    stage_table("select", manifest, extra={f"removed: {k}": v for k, v in manifest["removed_reasons"].items()})
    return manifest
