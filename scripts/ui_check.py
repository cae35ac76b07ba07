"""Open a finished flow run's page in headless Chromium, check that its stages and artifacts are shown,
and keep a screenshot.

    .venv/bin/python scripts/ui_check.py [FLOW_RUN_ID] [--api http://127.0.0.1:4200/api] [--shot docs/ui-flow-run.png]

Without an id it takes the newest `curate-and-pretrain` run. Needs Debian's `chromium` package. Exit 0 when
every expected stage (subflow) name and artifact key appears in the rendered page, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

async def _expected(api: str, run_id: str | None) -> tuple[str, dict[str, str]]:
    os.environ["PREFECT_API_URL"] = api
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter,
                                                FlowRunFilterParentFlowRunId)
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as client:
        if run_id is None:
            runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["curate-and-pretrain"])),
                                               sort=FlowRunSort.START_TIME_DESC, limit=1)
            if not runs:
                raise SystemExit("ui_check: no curate-and-pretrain run on this server")
            run_id = str(runs[0].id)
        # Every stage is a leaf subflow (curate groups some of them): walk the tree of child runs.
        stages, frontier = {}, [run_id]
        while frontier:
            children = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)))
            frontier = []
            for child in children:
                grandchildren = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[str(child.id)])), limit=1)
                if grandchildren:
                    frontier.append(str(child.id))
                else:
                    flow = await client.read_flow(child.flow_id)
                    stages[flow.name] = str(child.id)
        return run_id, dict(sorted(stages.items()))


async def _check(ui: str, run_id: str, stages: dict[str, str], shot: str) -> list[str]:
    from cdp import Browser

    missing = []
    async with Browser() as b:
        page = f"{ui}/runs/flow-run/{run_id}"
        await b.goto(page)
        if not await b.wait_for_text("Subflow Runs", timeout=60):
            return ["the flow-run page did not load"]
        await asyncio.sleep(3)  # let the run graph draw before the screenshot
        await b.screenshot(shot)
        await b.click_text("Subflow Runs")
        for name in ("curate", "pretrain", "evaluate"):
            if name in stages or name == "curate":
                if not await b.wait_for_text(name, timeout=20):
                    missing.append(f"stage {name} in Subflow Runs")
        await b.click_text("Artifacts")
        if not await b.wait_for_text("curate-and-pretrain-report", timeout=20):
            missing.append("artifact curate-and-pretrain-report")
        for name, child_id in stages.items():  # each stage's own page shows its summary table
            await b.goto(f"{ui}/runs/flow-run/{child_id}")
            await b.wait_for_text("Artifacts", timeout=60)
            await b.click_text("Artifacts")
            if not await b.wait_for_text(f"{name}-summary", timeout=20):
                missing.append(f"artifact {name}-summary")
    return missing


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_id", nargs="?")
    ap.add_argument("--api", default=os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api"))
    ap.add_argument("--shot", default="docs/ui-flow-run.png")
    args = ap.parse_args()
    run_id, stages = asyncio.run(_expected(args.api, args.run_id))
    ui = args.api.removesuffix("/api")
    missing = asyncio.run(_check(ui, run_id, stages, args.shot))
    print(f"page: {ui}/runs/flow-run/{run_id}\nscreenshot: {args.shot}\nstages: {', '.join(stages)}")
    if missing:
        print("not shown: " + "; ".join(missing))
        return 1
    print("every stage, its summary artifact and the run report are shown")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
