"""Dedup stage: components, keep rule, exact duplicates, planted copies, decontamination, outputs."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from curation.dedup.components import connected_components
from curation.dedup.knn import build_index, knn_pairs
from curation.dedup.selection import decide
from tests.dedup_helpers import make_pool, photo, save_jpeg


def _brute_components(n, a, b):
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for x, y in zip(a, b):
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    return np.array([min(i for i in range(n) if find(i) == find(j)) for j in range(n)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_components_match_a_plain_union_find(seed):
    rng = np.random.default_rng(seed)
    n = 300
    a, b = rng.integers(0, n, 250), rng.integers(0, n, 250)
    got = connected_components(n, a, b)
    assert np.array_equal(got, _brute_components(n, a.tolist(), b.tolist()))
    # labels are the smallest member: independent of edge order
    perm = rng.permutation(len(a))
    assert np.array_equal(connected_components(n, b[perm], a[perm]), got)


def test_knn_pairs_exact_and_ivf_find_planted_neighbours():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3000, 32)).astype(np.float32)
    copies = base[:100] + 0.05 * rng.standard_normal((100, 32)).astype(np.float32)
    x = np.concatenate([base, copies])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for kind in ("flat", "ivf", "hnsw"):
        idx, info = build_index(x, kind=kind)
        i, j, s = knn_pairs(idx, x, 8, min_score=0.9, exclude_self=True)
        pairs = set(zip(i.tolist(), j.tolist()))
        assert all(a < b for a, b in pairs)  # each unordered pair once
        found = sum((p, 3000 + p) in pairs for p in range(100))
        assert found >= (100 if kind == "flat" else 95), (kind, found)
        assert len(pairs) < 130  # random 32-d vectors are not above 0.9 of each other


@pytest.mark.cuda
def test_gpu_index_finds_the_cpu_pairs():
    from curation.knn import gpu_count

    if gpu_count() == 0:
        pytest.skip("no usable faiss GPU: faiss-gpu (the `gpu` extra) is absent or has no kernels for this GPU")
    rng = np.random.default_rng(1)
    base = rng.standard_normal((5000, 64)).astype(np.float32)
    x = np.concatenate([base, base[:200] + 0.05 * rng.standard_normal((200, 64)).astype(np.float32)])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for kind in ("flat", "ivf"):
        cpu, _ = build_index(x, kind=kind, use_gpu=False)
        gpu, info = build_index(x, kind=kind, use_gpu=True)
        assert info["gpu"], kind
        a = knn_pairs(cpu, x, 8, min_score=0.9, exclude_self=True)
        b = knn_pairs(gpu, x, 8, min_score=0.9, exclude_self=True)
        assert set(zip(a[0].tolist(), a[1].tolist())) == set(zip(b[0].tolist(), b[1].tolist())), kind
        np.testing.assert_allclose(np.sort(a[2]), np.sort(b[2]), atol=1e-4)  # float32 on the GPU too


def test_keep_rule_largest_then_first_seen_and_reasons():
    hashes = ["h0", "h1", "h2", "h1", "h4", None]
    area = np.array([100, 400, 400, 400, 50, 0])
    errors = [None] * 5 + ["undecodable:truncated"]
    edges = (np.array([0, 1]), np.array([1, 2]), np.array([0.9, 0.7], np.float32))
    d = decide(hashes, area, errors, edges)
    # component {0,1,2,3}: 1, 2, 3 tie on area; 1 is first seen
    assert d.keep.tolist() == [False, True, False, False, True, False]
    assert d.component.tolist() == [0, 0, 0, 0, 4, -1]
    assert d.reason[3] == "exact-duplicate" and d.matched[3] == 1
    assert d.reason[0] == "near-copy" and d.matched[0] == 1 and d.score[0] == pytest.approx(0.9)
    assert d.reason[2] == "near-copy" and d.matched[2] == 1
    assert d.reason[5] == "undecodable:truncated"
    assert d.group_size.tolist()[:5] == [4, 4, 4, 4, 1]


def test_an_image_linked_only_through_its_exact_twin_names_the_twins_copy():
    # 0 and 1 have the same pixels; only 1 has a copy edge (to 2, which is kept as the largest). 0 is the
    # first of its pixels, so it is no exact duplicate; it goes as a near copy of what its twin copies.
    d = decide(["H", "H", "K"], np.array([100, 100, 200]), [None] * 3,
               (np.array([1]), np.array([2]), np.array([0.9], np.float32)))
    assert d.keep.tolist() == [False, False, True]
    assert d.reason[0] == "near-copy" and d.matched[0] == 2 and d.score[0] == pytest.approx(0.9)
    assert d.reason[1] == "exact-duplicate" and d.matched[1] == 0


def test_decontamination_drops_whole_component():
    hashes = ["a", "b", "c", "d"]
    area = np.ones(4)
    edges = (np.array([0]), np.array([1]), np.array([0.8], np.float32))
    hits = (np.array([1]), np.array([0]), np.array([0.5], np.float32))
    d = decide(hashes, area, [None] * 4, edges, hits)
    assert d.keep.tolist() == [False, False, True, True]
    assert d.reason[0] == d.reason[1] == "reference-copy"
    assert d.matched[0] == 0 and d.matched[1] == 0


@pytest.fixture(scope="module")
def pool_result(tmp_path_factory):
    from curation.dedup.stage import run_dedup

    tmp = tmp_path_factory.mktemp("dedup")
    fam = make_pool(tmp / "pool")
    (tmp / "pool" / "readme.txt").write_text("not an image")
    (tmp / "pool" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    ref = tmp / "ref"
    ref.mkdir()
    save_jpeg(photo("coffee").rotate(4).resize((150, 100)), ref / "coffee_eval.jpg")
    m = run_dedup(tmp / "pool", tmp / "out", references=[ref], threads=2)
    rows = {r["path"]: r for r in pq.read_table(tmp / "out" / "dedup.parquet").to_pylist()}
    return tmp, fam, m, rows


def test_planted_copies_are_found_and_one_kept_per_family(pool_result):
    tmp, fam, m, rows = pool_result
    assert set(rows) == set(fam) | {"broken.jpg"}  # the .txt is not part of the pool
    assert rows["broken.jpg"]["reason"].startswith("undecodable") and not rows["broken.jpg"]["keep"]
    for a, b in itertools.combinations(fam, 2):
        same = rows[a]["component"] == rows[b]["component"]
        assert same == (fam[a] == fam[b]), (a, b)
    assert rows["astro_again.png"]["reason"] == "exact-duplicate"
    assert rows["astro_again.png"]["matched"] == "astro.png"
    for name in ("astro_small.jpg", "astro_cropflip.jpg", "cat_gray_rot.jpg"):
        assert rows[name]["reason"] == "near-copy" and not rows[name]["keep"]
        assert rows[name]["matched"] in ("astro.png", "cat.png")
        assert rows[name]["score"] >= 0.6
    assert rows["astro.png"]["keep"] and rows["cat.png"]["keep"]  # largest, then first seen
    for name in ("rocket.png", "noise0.png", "noise1.png"):
        assert rows[name]["keep"] and rows[name]["reason"] is None


def test_reference_copy_drops_its_component(pool_result):
    tmp, fam, m, rows = pool_result
    assert rows["coffee.png"]["keep"] is False
    assert rows["coffee.png"]["reason"] == "reference-copy"
    assert rows["coffee.png"]["matched"].endswith("coffee_eval.jpg")
    assert m["counts"]["reference_images"] == 1 and m["counts"]["reference_hits"] >= 1


def test_outputs_report_and_manifest(pool_result):
    tmp, fam, m, rows = pool_result
    out = tmp / "out"
    assert (out / "_SUCCESS").is_file()
    stage = json.loads((out / "stage.json").read_text())
    assert stage["counts"]["kept"] == sum(r["keep"] for r in rows.values())
    assert stage["digest"]
    report = (out / "report.md").read_text()
    assert "astro.png" in report and "coffee_eval.jpg" in report
    # The threshold sweep: this run's row is this run's counts; a higher threshold never keeps fewer images.
    sweep = stage["threshold_sweep"]
    this = next(r for r in sweep if r["threshold"] == 0.6)
    assert (this["kept"], this["copy_edges"]) == (stage["counts"]["kept"], stage["counts"]["copy_edges"])
    assert [r["threshold"] for r in sweep] == sorted(r["threshold"] for r in sweep)
    assert all(a["kept"] <= b["kept"] and a["copy_edges"] >= b["copy_edges"] for a, b in zip(sweep, sweep[1:]))
    assert "| 0.6 (this run) | " in report and "## Other thresholds" in report
    from PIL import Image

    grid = Image.open(out / "largest_groups.png")
    assert grid.height == 128 * 2  # two duplicate groups (astro, cat)
    assert not (tmp / "out.partial").exists()


def test_rerun_is_deterministic(pool_result, tmp_path):
    from curation.dedup.stage import run_dedup

    tmp, fam, m, rows = pool_result
    m2 = run_dedup(tmp / "pool", tmp_path / "again", references=[tmp / "ref"], threads=1)
    assert m2["digest"] == m["digest"]


def test_other_thresholds_reuse_the_candidates_and_equal_a_run_from_scratch(pool_result, tmp_path):
    """decide_dedup on the first run's candidates, at other thresholds, writes what a whole run at those
    thresholds writes; the scored pairs say which edges and reference hits it keeps."""
    from curation.dedup.stage import PAIRS, REFERENCE_PAIRS, candidates_dir_for, decide_dedup, run_dedup

    tmp, fam, m, rows = pool_result
    cand = candidates_dir_for(tmp / "out")
    scores = pq.read_table(cand / PAIRS).column("score").to_numpy()
    ref_scores = pq.read_table(cand / REFERENCE_PAIRS).column("score").to_numpy()
    # The built-in score, 1 - exp(-inliers / 8.73), saturates for these planted copies: only 1.0 cuts some
    # of them (a pair at 0.9999986 and the reference copy at 0.99998 go, the 1.0 pairs stay).
    th = rth = 1.0
    reused = decide_dedup(cand, tmp_path / "reused", threshold=th, reference_threshold=rth, threads=2)
    assert reused["counts"]["copy_edges"] == int((scores >= th).sum()) < m["counts"]["copy_edges"]
    assert reused["counts"]["reference_hits"] == int((ref_scores >= rth).sum()) < m["counts"]["reference_hits"]
    scratch = run_dedup(tmp / "pool", tmp_path / "scratch", references=[tmp / "ref"], threshold=th,
                        reference_threshold=rth, threads=2)
    assert reused["digest"] == scratch["digest"]
    assert reused["counts"] == scratch["counts"] and reused["counts"]["kept"] > m["counts"]["kept"]


def test_candidates_of_other_images_are_refused(pool_result, tmp_path):
    """Candidates are reused only on the images they were computed from: an image removed, or replaced
    under the same name, in the pool or in a reference set, makes the decision refuse them."""
    import shutil

    from curation.dedup.stage import candidates_dir_for, decide_dedup, find_candidates
    from lvdflow.errors import UserError

    tmp, fam, m, rows = pool_result
    with pytest.raises(UserError, match="not a complete dedup-candidates output"):
        decide_dedup(tmp / "out", tmp_path / "o")  # a dedup output, not its candidates
    pool, ref = tmp_path / "pool", tmp_path / "ref"
    shutil.copytree(tmp / "pool", pool)
    shutil.copytree(tmp / "ref", ref)
    cand = find_candidates(pool, candidates_dir_for(tmp_path / "o"), references=[ref], threads=2)
    assert cand["counts"]["images"] == len(rows)
    assert decide_dedup(cand["dir"], tmp_path / "o", threads=2)["counts"] == m["counts"]  # unchanged: reused

    (ref / "coffee_eval.jpg").write_bytes((pool / "coffee.png").read_bytes())  # same name, other image
    with pytest.raises(UserError, match=f"the images in {ref} changed since"):
        decide_dedup(cand["dir"], tmp_path / "o2")
    shutil.copy2(tmp / "ref" / "coffee_eval.jpg", ref)  # the same bytes and mtime back: the reference as it was
    (pool / "rocket.png").write_bytes((pool / "cat.png").read_bytes())  # the names alone did not change
    with pytest.raises(UserError, match=f"the images in {pool} changed since"):
        decide_dedup(cand["dir"], tmp_path / "o2")
    (pool / "rocket.png").unlink()
    with pytest.raises(UserError, match="rerun its candidates stage"):
        decide_dedup(cand["dir"], tmp_path / "o2")
    assert not (tmp_path / "o2").exists()


def test_bad_inputs_are_user_errors(tmp_path):
    from curation.dedup.stage import run_dedup
    from lvdflow.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        run_dedup(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        run_dedup(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(UserError, match="unknown descriptor"):
        make = __import__("curation.dedup.descriptors", fromlist=["make_descriptor"]).make_descriptor
        make("phash")
