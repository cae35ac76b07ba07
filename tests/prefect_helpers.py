"""Reading task-run states back from the Prefect API, for cache tests."""

from __future__ import annotations

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId


def task_states(flow_run_id) -> dict[str, str]:
    """{task name: state name} for every task run of a flow run and its subflow runs."""
    with get_client(sync_client=True) as client:
        runs = [flow_run_id]
        frontier = [flow_run_id]
        while frontier:
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)))
            frontier = [c.id for c in children]
            runs += frontier
        trs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=runs)))
        # subflow calls appear as task runs too (dummy tasks); keep real stage tasks only
        return {t.name.rsplit("-", 1)[0]: t.state.name for t in trs if t.task_key and not t.name.startswith(
            tuple(("demo-data-flow", "ingest-flow")))}
