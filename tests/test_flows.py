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


def test_query_set_names_are_folder_safe_and_unique(tmp_path):
    from flows.pipeline import query_set_names

    (tmp_path / "food 101").mkdir()
    (tmp_path / "b" / "food 101").mkdir(parents=True)
    names = query_set_names([str(tmp_path / "food 101"), str(tmp_path / "b" / "food 101"), "/data/in22k.tar",
                             "/lists/in22k.parquet"])
    assert names == ["food-101", "food-101-2", "in22k", "in22k-2"]


def test_curate_ingests_embeds_and_retrieves_each_query_set_on_its_own(tmp_path):
    """Two curated query sets of different sizes: each gets its own ingest and embedding, so retrieval picks
    each one's mode by its own size (sample-based for the big one, cluster-based for the small one)."""
    import torch

    from flows.config import load_profile
    from flows.pipeline import curate
    from pretrain.models import build_vit, save_backbone

    torch.manual_seed(0)
    weights = save_backbone(build_vit("vit_tiny", embed_dim=64, depth=2, num_heads=2, patch_size=16, img_size=32),
                            tmp_path / "tiny.pt")
    _write_images(tmp_path / "pool", 24)
    _write_images(tmp_path / "products", 8, seed=1)
    _write_images(tmp_path / "landmarks", 3, seed=2)
    cfg = load_profile("test", {
        "run_dir": str(tmp_path / "run"), "pool": [str(tmp_path / "pool")],
        "queries": [str(tmp_path / "products"), str(tmp_path / "landmarks")], "ingest": {"workers": 0},
        "dedup": {"enabled": False},
        "embed": {"weights": str(weights), "arch": "vit_tiny", "patch_size": 16, "img_size": 32},
        "retrieve": {"k": 2, "sample_threshold": 5, "n_clusters": 4}})
    stages, _ = run_flow(curate, config=cfg)
    assert stages["ingest-queries/products"]["counts"]["images"] == 8
    assert stages["ingest-queries/landmarks"]["counts"]["images"] == 3
    assert Path(stages["embed-queries/landmarks"]["dir"]) == tmp_path / "run" / "embed-queries" / "landmarks"
    modes = {name: s["mode"] for name, s in stages["retrieve"]["query_sets"].items()}
    assert modes == {"products": "sample", "landmarks": "cluster"}
    assert "bootstrap" not in stages  # an embedder was given
