"""Training and distillation launched under torchrun from their Prefect flows: 2 CPU processes (gloo),
every rank's output streamed into the flow run's logs, and a failing rank failing the flow."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.image_helpers import noise_images

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]

FAST = {"total_iters": 3, "checkpoint_every": 3, "warmup_iters": 1, "warmup_teacher_temp_iters": 1,
        "freeze_last_layer_iters": 1, "batch_size_per_rank": 4, "eval_every": 0, "num_threads": 1}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from curation.ingest import run_ingest
    from shards.writer import run_shard

    root = tmp_path_factory.mktemp("torchrun")
    noise_images(root / "images", 48, size=(32, 32))
    run_ingest([root / "images"], root / "ingest", workers=0)
    run_shard(root / "ingest", root / "shards", max_count=12)  # 4 shards: 2 per rank
    return root / "shards"


def _logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]


def _wait_for_logs(flow_run_id, predicate, timeout: float = 30) -> list[str]:
    import time

    deadline = time.time() + timeout
    while True:
        logs = _logs(flow_run_id)
        if predicate(logs) or time.time() > deadline:
            return logs
        time.sleep(1)


def test_pretrain_and_distill_flows_run_two_ranks_under_torchrun(shards, tmp_path):
    from flows.distill import distill_flow
    from flows.pretrain import pretrain_flow

    state = pretrain_flow(shards=str(shards), out=str(tmp_path / "pretrain"), config="demo", overrides=FAST,
                          nproc=2, return_state=True)
    assert state.is_completed(), state
    manifest = state.result()
    assert manifest["params"]["nproc"] == 2 and manifest["counts"]["iterations"] == 3
    assert manifest["counts"]["global_batch"] == 2 * FAST["batch_size_per_rank"]  # both ranks trained
    logs = _wait_for_logs(state.state_details.flow_run_id, lambda ls: any(m.startswith("[rank1]") for m in ls))
    assert any(m.startswith("[rank0]") for m in logs), logs[-20:]  # rank 0's lines ...
    assert any(m.startswith("[rank1]") for m in logs), logs[-20:]  # ... and rank 1's, in the flow run
    assert list((Path(manifest["dir"]) / "torchrun-logs").rglob("stdout.log"))  # and kept in files

    teacher = Path(manifest["dir"]) / manifest["outputs"]["teacher_with_heads"]
    state = distill_flow(teacher=str(teacher), shards=str(shards), out=str(tmp_path / "distill"),
                         overrides=FAST, nproc=2, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["counts"]["iterations"] == 3 and result["params"]["nproc"] == 2
    assert result["counts"]["global_batch"] == 2 * FAST["batch_size_per_rank"]
    assert all(Path(s["backbone"]).is_file() for s in result["students"].values())


def test_a_failing_rank_fails_the_flow_with_its_error(shards, tmp_path):
    from flows.pretrain import pretrain_flow

    # An absurd learning rate: the loss goes non-finite and the ranks stop with the iteration named.
    state = pretrain_flow(shards=str(shards), out=str(tmp_path / "diverged"), config="demo",
                          overrides={**FAST, "base_lr": 1e30, "total_iters": 6, "checkpoint_every": 100},
                          nproc=2, return_state=True)
    assert state.is_failed(), state
    with pytest.raises(RuntimeError, match="pretrain.train under torchrun failed") as err:
        state.result()
    assert "non-finite loss at iteration" in str(err.value)  # the rank's own error, in the flow's failure
    assert not (tmp_path / "diverged").exists()
