"""A stage flow runs under Prefect, caches across runs on content, and reruns when it must (the whole DAG's
caching: tests/test_deployment.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.image_helpers import noise_images
from tests.prefect_helpers import run_flow

pytestmark = pytest.mark.usefixtures("prefect_server")


def _write_images(folder: Path, n: int, seed: int = 0) -> None:
    noise_images(folder, n, size=(32, 32), seed=seed, name="{i}.png")


def test_ingest_flow_caches_and_reruns(tmp_path):
    from flows.ingest import ingest_flow

    src, out = tmp_path / "src", tmp_path / "out"
    _write_images(src, 5)
    kw = dict(sources=[str(src)], out=str(out), workers=0)
    m1, s1 = run_flow(ingest_flow, **kw)
    assert m1["counts"]["images"] == 5 and s1["ingest"] == "Completed"

    _, s2 = run_flow(ingest_flow, **kw)
    assert s2["ingest"] == "Cached"

    shutil.rmtree(out)  # output gone: the cache record must not be trusted
    m3, s3 = run_flow(ingest_flow, **kw)
    assert s3["ingest"] == "Completed" and (out / "manifest.parquet").is_file()

    _, s4 = run_flow(ingest_flow, **kw, min_side=40)  # a parameter changed
    assert s4["ingest"] == "Completed"

    _write_images(src, 6, seed=1)  # the input's content changed behind the same path
    m5, s5 = run_flow(ingest_flow, **kw)
    assert s5["ingest"] == "Completed" and m5["counts"]["images"] == 6

    _, s6 = run_flow(ingest_flow, **kw, refresh=["ingest"])
    assert s6["ingest"] == "Completed"
