"""End to end: prefect.yaml deploys `curate-and-pretrain/local`, a process worker runs the whole DAG."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.prefect_helpers import deploy_and_run_local

ROOT = Path(__file__).resolve().parents[1]

STAGE_ARTIFACTS = {"demo-data-summary", "ingest-summary", "dedup-summary", "select-summary", "embed-summary",
                   "retrieve-summary", "shard-summary", "pretrain-summary", "distill-summary", "evaluate-summary",
                   "curate-and-pretrain-report"}


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_deployment_from_prefect_yaml_runs_the_dag_on_a_process_worker(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    flow_run = deploy_and_run_local(PREFECT_API_URL.value(), str(tmp_path / "run"), ROOT)
    assert flow_run.state.is_completed(), flow_run.state  # --run-once exits 0 even when the run failed
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts() if a.key}
    assert STAGE_ARTIFACTS <= keys, STAGE_ARTIFACTS - keys
    run = tmp_path / "run"
    assert (run / "ingest" / "manifest.parquet").is_file()
    assert list((run / "shards").glob("*.tar"))
    assert (run / "pretrain" / "teacher" / "teacher_backbone.pth").is_file()
