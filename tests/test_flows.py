"""Stage flows run under Prefect, cache across runs on content, and rerun when they must."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.image_helpers import noise_images
from tests.prefect_helpers import task_states

pytestmark = pytest.mark.usefixtures("prefect_server")


def _write_images(folder: Path, n: int, seed: int = 0) -> None:
    noise_images(folder, n, size=(32, 32), seed=seed, name="{i}.png")


def _run(flow, **kw):
    state = flow(return_state=True, **kw)
    assert state.is_completed(), state
    return state.result(), task_states(state.state_details.flow_run_id)


def test_ingest_flow_caches_and_reruns(tmp_path):
    from flows.ingest import ingest_flow

    src, out = tmp_path / "src", tmp_path / "out"
    _write_images(src, 5)
    kw = dict(sources=[str(src)], out=str(out), workers=0)
    m1, s1 = _run(ingest_flow, **kw)
    assert m1["counts"]["images"] == 5 and s1["ingest"] == "Completed"

    _, s2 = _run(ingest_flow, **kw)
    assert s2["ingest"] == "Cached"

    shutil.rmtree(out)  # output gone: the cache record must not be trusted
    m3, s3 = _run(ingest_flow, **kw)
    assert s3["ingest"] == "Completed" and (out / "manifest.parquet").is_file()

    _, s4 = _run(ingest_flow, **kw, min_side=40)  # a parameter changed
    assert s4["ingest"] == "Completed"

    _write_images(src, 6, seed=1)  # the input's content changed behind the same path
    m5, s5 = _run(ingest_flow, **kw)
    assert s5["ingest"] == "Completed" and m5["counts"]["images"] == 6

    _, s6 = _run(ingest_flow, **kw, refresh=["ingest"])
    assert s6["ingest"] == "Completed"


CURATE = ["demo-data", "ingest", "dedup", "select", "shard", "pretrain", "embed", "retrieve"]


def test_pipeline_caches_and_reruns_only_what_changed(tmp_path):
    """The whole DAG (test profile): first run computes, the second is all cache, a changed dedup threshold
    reruns dedup and what follows it while ingest stays cached, a deleted stage output reruns that stage."""
    from flows.pipeline import curate_and_pretrain

    base = {"run_dir": str(tmp_path / "run")}
    r1, s1 = _run(curate_and_pretrain, profile="test", overrides=base)
    assert set(CURATE + ["distill", "evaluate"]) <= set(s1)
    assert all(st == "Completed" for states in s1.values() for st in _as_list(states)), s1
    assert r1["ingest"]["counts"]["quarantined"] == 7

    r2, s2 = _run(curate_and_pretrain, profile="test", overrides=base)
    assert all(st == "Cached" for states in s2.values() for st in _as_list(states)), s2
    assert r2 == r1

    _, s3 = _run(curate_and_pretrain, profile="test", overrides={**base, "dedup": {"threshold": 0.5}})
    assert s3["demo-data"] == "Cached" and _as_list(s3["ingest"]) == ["Cached", "Cached"]
    assert s3["dedup"] == "Completed" and s3["select"] in ("Completed", "Cached")

    shutil.rmtree(tmp_path / "run" / "retrieve")
    _, s4 = _run(curate_and_pretrain, profile="test", overrides={**base, "dedup": {"threshold": 0.5}})
    assert s4["retrieve"] == "Completed" and s4["dedup"] == "Cached"
    assert (tmp_path / "run" / "retrieve" / "_SUCCESS").is_file()


def _as_list(states):
    return states if isinstance(states, list) else [states]
