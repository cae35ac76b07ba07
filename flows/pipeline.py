"""The `curate-and-pretrain` DAG: every stage in order, each cached across runs.

Stages append themselves here as they are built. `refresh` names stages to rerun regardless of cache.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.demo_data import demo_data_flow
from flows.ingest import ingest_flow


@flow(name="curate-and-pretrain", log_prints=True)
def curate_and_pretrain(
    run_dir: str = "runs/local",
    demo_size: str = "small",
    pool: list[str] | None = None,
    refresh: list[str] | None = None,
    workers: int | None = None,
    min_side: int = 16,
) -> dict:
    """Curate an image pool and pretrain on it.

    With no `pool` given, the demo data is built under `run_dir`/demo (size `demo_size`) and its pool is
    curated; otherwise `pool` lists folders, tar shards or path lists to ingest.
    """
    root = Path(run_dir)
    refresh = list(refresh or [])
    results: dict[str, dict] = {}
    if not pool:
        demo = demo_data_flow(out=str(root / "demo"), size=demo_size, refresh=refresh)
        results["demo-data"] = demo
        pool = [str(Path(demo["dir"]) / demo["outputs"]["pool"])]
    results["ingest"] = ingest_flow(sources=pool, out=str(root / "ingest"), workers=workers,
                                    min_side=min_side, refresh=refresh)

    lines = ["# curate-and-pretrain", "", "| stage | output | counts |", "| --- | --- | --- |"]
    for name, m in results.items():
        counts = ", ".join(f"{k}={v}" for k, v in m.get("counts", {}).items())
        lines.append(f"| {name} | `{m['dir']}` | {counts} |")
    create_markdown_artifact(key="curate-and-pretrain-report", markdown="\n".join(lines),
                             description="Stages of this run and their outputs")
    get_run_logger().info("done: %s", {k: v["dir"] for k, v in results.items()})
    return {k: {"dir": v["dir"], "counts": v.get("counts", {})} for k, v in results.items()}


if __name__ == "__main__":
    curate_and_pretrain()
