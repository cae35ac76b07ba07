"""Prefect flow for the demo-data stage."""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from curation.demo_data import build_demo_data
from flows.caching import run_stage, stage_cache_key
from flows.reporting import stage_table


@task(name="demo-data", cache_key_fn=stage_cache_key, persist_result=True)
def demo_data_task(out: str, size: str = "small", seed: int = 0) -> dict:
    return build_demo_data(out, size=size, seed=seed)


@flow(name="demo-data", log_prints=True)
def demo_data_flow(out: str, size: str = "small", seed: int = 0, refresh: list[str] | None = None) -> dict:
    """Build the demo pool, queries and evaluation sets from Debian's real image packages."""
    manifest = run_stage(demo_data_task, out=out, refresh=refresh, size=size, seed=seed)
    get_run_logger().info("demo data in %s: %s", manifest["dir"], manifest["counts"])
    stage_table("demo-data", manifest)
    return manifest
