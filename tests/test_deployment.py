"""End to end, as a user runs it: prefect.yaml deploys `curate-and-pretrain/local`, a process worker runs the
whole DAG, a second run finds every stage in the cache, and a changed parameter or a
deleted stage output reruns only what it must."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.prefect_helpers import deploy_local, run_flow, run_local_deployment, task_states

ROOT = Path(__file__).resolve().parents[1]

STAGE_ARTIFACTS = {"demo-data-summary", "ingest-summary", "dedup-candidates-summary", "dedup-summary",
                   "select-summary", "embed-summary", "retrieve-summary", "shard-summary", "pretrain-summary",
                   "distill-summary", "evaluate-summary", "curate-and-pretrain-report"}
STAGES = ["demo-data", "ingest", "dedup-candidates", "dedup", "select", "shard", "pretrain", "embed", "retrieve",
          "distill", "evaluate"]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_deployment_runs_the_dag_then_reruns_only_what_changed(tmp_path):
    """One whole DAG computed, then reused: the run through the worker computes every stage; a second run
    (in this process, so not the one that wrote the cache) is all cache; then, on the same cache,
    a changed dedup threshold reruns dedup's decision and what follows it while ingest and dedup's
    candidates stay cached, and a deleted stage output reruns that stage."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from flows.pipeline import curate_and_pretrain

    api, run = PREFECT_API_URL.value(), tmp_path / "run"
    base = {"run_dir": str(run)}
    deploy_local(api, ROOT)

    first = run_local_deployment(api, ROOT, base)
    assert first.state.is_completed(), first.state  # --run-once exits 0 even when the run failed
    s1 = task_states(first.id)
    assert set(STAGES) <= set(s1)
    assert all(st == "Completed" for states in s1.values() for st in _as_list(states)), s1
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts() if a.key}
    assert STAGE_ARTIFACTS <= keys, STAGE_ARTIFACTS - keys
    assert json.loads((run / "ingest" / "stage.json").read_text())["counts"]["quarantined"] == 7
    assert list((run / "shards").glob("*.tar"))
    assert (run / "pretrain" / "teacher" / "teacher_backbone.pth").is_file()

    # Run again, in this process: another process than the worker's flow run, so the cache records are
    # read back from the result store. (A second run through a worker tested nothing more and cost ~50 s,
    # most of it two fresh interpreters importing Prefect and torch.)
    _, s2 = run_flow(curate_and_pretrain, profile="test", overrides=base)
    assert set(s2) == set(s1)
    assert all(st == "Cached" for states in s2.values() for st in _as_list(states)), s2

    changed = {**base, "dedup": {"threshold": 0.5}}
    _, s3 = run_flow(curate_and_pretrain, profile="test", overrides=changed)
    assert s3["demo-data"] == "Cached" and _as_list(s3["ingest"]) == ["Cached", "Cached"]
    assert s3["dedup-candidates"] == "Cached"  # the descriptors and scored pairs do not depend on it
    assert s3["dedup"] == "Completed" and s3["select"] in ("Completed", "Cached")

    shutil.rmtree(run / "retrieve")
    _, s4 = run_flow(curate_and_pretrain, profile="test", overrides=changed)
    assert s4["retrieve"] == "Completed" and s4["dedup"] == "Cached"
    assert (run / "retrieve" / "_SUCCESS").is_file()


def _as_list(states):
    return states if isinstance(states, list) else [states]
