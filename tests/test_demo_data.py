"""The demo data is built from the real Debian image packages, deterministic, and its ground truth holds."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.demo_data import CLASSES, build_demo_data
from curation.ingest import run_ingest
from lvdflow.errors import UserError


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    return build_demo_data(out, size="tiny", seed=0)


def test_layout_and_counts(demo):
    from pathlib import Path

    root = Path(demo["dir"])
    gt = pq.read_table(root / "ground_truth.parquet").to_pylist()
    pool_files = sorted(str(p.relative_to(root / "pool")) for p in (root / "pool").rglob("*") if p.is_file())
    assert sorted(r["relpath"] for r in gt) == pool_files
    kinds = {r["kind"] for r in gt}
    assert kinds == {"fmnist", "clipart", "tile", "copy", "broken"}
    assert len(list((root / "queries").glob("*.png"))) == demo["counts"]["queries"] == 20
    assert sorted(p.name for p in (root / "eval" / "train").iterdir()) == sorted(CLASSES)
    assert sorted(p.name for p in (root / "eval" / "test").iterdir()) == sorted(CLASSES)
    for copy in (r for r in gt if r["kind"] == "copy"):
        assert copy["copy_of"] in pool_files and copy["edit"]
    # real images: Fashion-MNIST is 28x28 grayscale
    q = Image.open(next((root / "queries").glob("*.png")))
    assert q.size == (28, 28) and q.mode == "L"


def test_queries_and_eval_are_not_in_the_pool(demo):
    from pathlib import Path

    root = Path(demo["dir"])
    pool = {p.read_bytes() for p in (root / "pool").rglob("*.png")}
    others = list((root / "queries").glob("*.png")) + list((root / "eval").rglob("*.png"))
    assert others and not any(p.read_bytes() in pool for p in others)


def test_ingest_quarantines_exactly_the_broken_files(demo, tmp_path):
    from pathlib import Path

    root = Path(demo["dir"])
    gt = pq.read_table(root / "ground_truth.parquet").to_pylist()
    m = run_ingest([root / "pool"], tmp_path / "ing", workers=0)
    q = {r["relpath"]: r["reason"] for r in pq.read_table(tmp_path / "ing" / "quarantine.parquet").to_pylist()}
    expected = {r["relpath"]: r["expected_reason"] for r in gt if r["kind"] == "broken"}
    assert q == expected
    assert m["counts"]["images"] == len(gt) - len(expected)


def test_deterministic(demo, tmp_path):
    again = build_demo_data(tmp_path / "again", size="tiny", seed=0)
    assert again["digest"] == demo["digest"]


def test_unknown_size_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown size"):
        build_demo_data(tmp_path / "x", size="huge")
