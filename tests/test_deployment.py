"""End to end: prefect.yaml deploys `curate-and-pretrain/local`, a process worker runs it to Completed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_deployment_from_prefect_yaml_runs_on_a_process_worker(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    run = lambda *args, **kw: subprocess.run(PREFECT + list(args), env=env, cwd=ROOT, capture_output=True,  # noqa: E731
                                             text=True, timeout=kw.get("timeout", 300))
    r = run("work-pool", "create", "lvdflow-local", "--type", "process", "--overwrite")
    assert r.returncode == 0, r.stderr
    r = run("deploy", "--all", "--no-prompt")
    assert r.returncode == 0, r.stdout + r.stderr

    flow_run = run_deployment("curate-and-pretrain/local", timeout=0,
                              parameters={"run_dir": str(tmp_path / "run"), "demo_size": "tiny", "workers": 1})
    r = run("worker", "start", "--pool", "lvdflow-local", "--run-once", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.id).state
        assert state.is_completed(), state  # --run-once exits 0 even when the run failed
        keys = {a.key for a in client.read_artifacts() if a.key}
    assert {"demo-data-summary", "ingest-summary", "curate-and-pretrain-report"} <= keys
    assert (tmp_path / "run" / "ingest" / "manifest.parquet").is_file()
