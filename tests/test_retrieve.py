"""Retrieval curation: kNN and cluster rules, collisions, index choice, hierarchical sampling, the stage."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from _retrieval_data import blob_vectors, write_embeddings, write_images, write_manifest
from curation import knn
from curation.embedding_store import l2_normalise
from curation.hierarchical_kmeans import balanced_sample, hierarchical_kmeans, water_fill
from curation.kmeans import assign, kmeans, members_by_cluster
from curation.retrieve import Pairs, cluster_based, merge_collisions, run_retrieve, sample_based
from lvdflow.errors import UserError
from lvdflow.stage import is_complete


def _centers(rng, n, d=32):
    return np.linalg.qr(rng.normal(size=(d, d)))[0][:n] * 1.0  # orthonormal: well separated blobs


def test_sample_based_matches_brute_force_and_merges_collisions():
    rng = np.random.default_rng(0)
    pool = l2_normalise(rng.normal(size=(500, 16)))
    queries = l2_normalise(rng.normal(size=(20, 16)))
    queries[1] = queries[0]  # two identical queries: every neighbour is a collision
    index = knn.build_index(pool.astype(np.float16), spec="Flat")
    pairs = sample_based(index, queries, k=4)
    assert len(pairs.pool) == 80
    brute = np.argsort(-(queries @ pool.astype(np.float16).astype(np.float32).T), axis=1)[:, :4]
    got = pairs.pool.reshape(20, 4)
    assert all(set(got[i]) == set(brute[i]) for i in range(20))
    uniq, offsets, merged = merge_collisions(pairs)
    assert len(uniq) == len(set(pairs.pool.tolist()))
    # The neighbours of query 0 are each listed once, with both query 0 and query 1.
    for p in got[0]:
        i = int(np.searchsorted(uniq, p))
        qs = merged.query[offsets[i] : offsets[i + 1]]
        assert {0, 1} <= set(qs.tolist())
        ds = merged.distance[offsets[i] : offsets[i + 1]]
        assert np.all(np.diff(ds) >= 0)  # nearest query first


def test_merge_drops_duplicate_pairs():
    pairs = Pairs(np.array([5, 5, 3, 5]), np.array([1, 1, 0, 2]), np.array([0.2, 0.1, 0.5, 0.3], np.float32))
    uniq, offsets, merged = merge_collisions(pairs)
    assert uniq.tolist() == [3, 5]
    assert merged.query[offsets[1] : offsets[2]].tolist() == [1, 2]
    assert merged.distance[offsets[1]] == pytest.approx(0.1)


def test_cluster_based_takes_only_clusters_with_more_than_min_queries():
    rng = np.random.default_rng(1)
    centers = _centers(rng, 3)
    pool, blob = blob_vectors(rng, centers, [300, 300, 300])
    queries, qblob = blob_vectors(rng, centers, [6, 2, 0])  # blob 0: 6 queries (> 3), blob 1: 2 (not enough)
    km = kmeans(pool.astype(np.float16), 3, seed=0)
    members = members_by_cluster(km.assignment, 3)
    qlab, _ = assign(queries, km.centroids)
    pairs, chosen = cluster_based(
        pool, members, km.similarity, qlab, queries, min_queries=3, per_cluster=100, per_source_cap=None, rng=rng
    )
    assert len(chosen) == 1
    got = np.unique(pairs.pool)
    assert len(got) == 100  # per-cluster limit
    assert set(blob[got].tolist()) == {0}
    # Each image lists the (up to 8) queries of its cluster: here the 6 blob-0 queries.
    assert len(pairs.pool) == 100 * 6
    # Cap per source: shrinks the set uniformly.
    capped, _ = cluster_based(
        pool, members, km.similarity, qlab, queries, min_queries=3, per_cluster=1000, per_source_cap=40, rng=rng
    )
    assert len(np.unique(capped.pool)) == 40


def test_index_choice_by_size_and_ivf_recall():
    assert knn.choose_index_spec(1000, 64) == "Flat"
    assert knn.choose_index_spec(1_000_000, 768) == "IVF1024,SQfp16"
    assert knn.choose_index_spec(1_000_000, 768, gpu=True) == "IVF4096,SQfp16"
    assert knn.choose_index_spec(20_000_000, 768, gpu=True) == "IVF16384,PQ64"
    rng = np.random.default_rng(2)
    x = l2_normalise(rng.normal(size=(8000, 32))).astype(np.float16)
    ivf = knn.build_index(x, spec="auto", flat_max=1000, nprobe=64)
    assert ivf.spec.startswith("IVF")
    flat = knn.build_index(x, spec="Flat")
    _, a = knn.search(ivf, x[:200], 5)
    _, b = knn.search(flat, x[:200], 5)
    recall = np.mean([len(set(a[i]) & set(b[i])) / 5 for i in range(200)])
    assert recall > 0.9
    pq_index = knn.build_index(x, spec="IVF16,PQ8x4", nprobe=16)
    _, c = knn.search(pq_index, x[:200], 1)
    assert np.mean(c[:, 0] == np.arange(200)) > 0.5  # each point finds itself, approximately


def test_water_fill_is_balanced_and_exact():
    rng = np.random.default_rng(0)
    b = water_fill(np.array([1000, 100, 50, 5]), 155, rng)
    assert b.sum() == 155 and b[3] == 5 and b[2] == 50 and b[0] == 50 and b[1] == 50
    assert water_fill(np.array([3, 4]), 100, rng).tolist() == [3, 4]


def test_hierarchical_balanced_sampling_rebalances_unequal_blobs():
    rng = np.random.default_rng(3)
    centers = _centers(rng, 3)
    x, blob = blob_vectors(rng, centers, [2000, 200, 60], spread=0.02)
    tree = hierarchical_kmeans(x.astype(np.float16), [30, 3], n_resampling_steps=[2, 1], seed=0)
    assert len(tree.levels) == 2 and len(tree.levels[1].assignment) == 30
    top = tree.point_clusters(1)
    # The top level recovers the three blobs.
    assert all(len(set(top[blob == b].tolist())) == 1 for b in range(3))
    for strategy in ("r", "c"):
        picked = balanced_sample(tree, 180, strategy=strategy, seed=0)
        assert len(picked) == len(set(picked.tolist())) == 180
        assert np.bincount(blob[picked]).tolist() == [60, 60, 60]  # random sampling would give ~[137, 14, 4]


def test_resampling_spreads_centroids_away_from_the_dense_blob():
    # Flat k-means spends most centroids on the dominant blob; each resampling step reruns k-means on the
    # points nearest every centroid, which must move centroids towards the sparse blobs (Vo et al. 2024).
    rng = np.random.default_rng(3)
    centers = _centers(rng, 3)
    x, _ = blob_vectors(rng, centers, [2000, 200, 60], spread=0.02)

    def centroids_in_dominant_blob(steps: int) -> int:
        c = hierarchical_kmeans(x.astype(np.float16), [30], n_resampling_steps=[steps], seed=0).levels[0].centroids
        return int(np.sum(np.argmax(c @ centers.T, axis=1) == 0))

    flat, resampled = centroids_in_dominant_blob(0), centroids_in_dominant_blob(2)
    assert flat >= 20  # 2000 of 2260 points: density-following k-means
    assert resampled <= flat - 5


@pytest.fixture
def pool_dir(tmp_path):
    """600 image files in 3 embedding blobs (400/150/50), their manifest and embeddings, plus query sets."""
    rng = np.random.default_rng(4)
    table = write_images(tmp_path / "images", 600, rng)
    centers = _centers(rng, 3)
    vecs, blob = blob_vectors(rng, centers, [400, 150, 50])
    ids = table["id"].to_pylist()
    write_embeddings(tmp_path / "pool_emb", ids, vecs, shard_size=250)
    write_manifest(table, tmp_path / "ingest" / "manifest.parquet")
    big, _ = blob_vectors(rng, centers, [0, 30, 0])  # "large" set: sample-based above the threshold
    small, _ = blob_vectors(rng, centers, [0, 0, 8])  # small set: cluster-based
    write_embeddings(tmp_path / "q_big", [f"b{i}" for i in range(30)], big)
    write_embeddings(tmp_path / "q_small", [f"s{i}" for i in range(8)], small)
    return tmp_path, blob, ids


def test_run_retrieve_auto_mode_writes_table_and_report(pool_dir):
    tmp, blob, ids = pool_dir
    out = tmp / "retrieved"
    m = run_retrieve(
        tmp / "pool_emb", [tmp / "q_big", tmp / "q_small"], tmp / "ingest", out,
        sample_threshold=20, k=4, n_clusters=3, per_cluster=1000, seed=0,
    )
    assert is_complete(out)
    assert m["query_sets"]["q_big"]["mode"] == "sample"
    assert m["query_sets"]["q_small"]["mode"] == "cluster"
    t = pq.read_table(out / "retrieved.parquet")
    for col in ("id", "uri", "source", "member", "relpath", "sha256", "cluster", "queries", "query_sets", "distances"):
        assert col in t.column_names
    assert len(set(t["id"].to_pylist())) == t.num_rows  # collisions kept once
    blob_of = {i: int(blob[n]) for n, i in enumerate(ids)}
    rows = t.to_pylist()
    small_rows = [r for r in rows if "q_small" in r["query_sets"]]
    big_rows = [r for r in rows if "q_big" in r["query_sets"]]
    assert small_rows and big_rows
    assert {blob_of[r["id"]] for r in small_rows} == {2}  # the small set pulls in only its blob
    assert {blob_of[r["id"]] for r in big_rows} == {1}
    assert len(small_rows) == 50  # every image of the cluster holding its queries (3 clusters = the 3 blobs)
    assert sum(len(r["queries"]) > 1 for r in rows) == m["counts"]["collisions"]
    assert sum(len(r["queries"]) > 1 for r in big_rows) > 0  # 30 queries x 4 neighbours in one blob of 150
    for r in rows:
        assert len(r["queries"]) == len(r["distances"]) == len(r["query_sets"])
        assert r["distances"] == sorted(r["distances"])
    assert (out / "report" / "report.md").is_file()
    assert (out / "report" / "clusters.png").stat().st_size > 0
    assert (out / "report" / "queries.png").stat().st_size > 0
    assert json.loads((out / "stage.json").read_text())["counts"]["retrieved"] == t.num_rows


def test_run_retrieve_forced_modes_and_balanced(pool_dir):
    tmp, blob, ids = pool_dir
    m = run_retrieve(tmp / "pool_emb", tmp / "q_small", tmp / "ingest", tmp / "o1", mode="sample", k=2, report=False)
    assert m["query_sets"]["q_small"]["mode"] == "sample" and m["counts"]["pairs"] == 16
    m = run_retrieve(
        tmp / "pool_emb", None, tmp / "ingest", tmp / "o2", mode="balanced", target_size=90,
        hierarchical_levels=[12, 3], report=False,
    )
    t = pq.read_table(tmp / "o2" / "retrieved.parquet")
    pos = {i: n for n, i in enumerate(ids)}
    assert t.num_rows == 90
    assert np.bincount([blob[pos[i]] for i in t["id"].to_pylist()]).tolist() == [30, 30, 30]
    assert all(len(q) == 0 for q in t["queries"].to_pylist())
    # Cluster mode over hierarchical k-means: the finest level's clusters are the retrieval units.
    m = run_retrieve(
        tmp / "pool_emb", tmp / "q_small", tmp / "ingest", tmp / "o3", mode="cluster", clustering="hierarchical",
        hierarchical_levels=[6, 3], report=False,
    )
    t = pq.read_table(tmp / "o3" / "retrieved.parquet")
    assert m["counts"]["clusters"] == 6 and t.num_rows > 0
    assert {int(blob[pos[i]]) for i in t["id"].to_pylist()} == {2}


def test_run_retrieve_bad_inputs_are_user_errors(pool_dir, tmp_path):
    tmp, _, ids = pool_dir
    with pytest.raises(UserError, match="mode"):
        run_retrieve(tmp / "pool_emb", tmp / "q_small", tmp / "ingest", tmp / "x", mode="nearest")
    with pytest.raises(UserError, match="pool embeddings"):
        run_retrieve(tmp / "nowhere", tmp / "q_small", tmp / "ingest", tmp / "x")
    other = tmp_path / "other_q"
    write_embeddings(other, ["z"], np.ones((1, 8)))
    with pytest.raises(UserError, match="dimension"):
        run_retrieve(tmp / "pool_emb", other, tmp / "ingest", tmp / "x")
    # A manifest from another ingest: the retrieved ids are not in it.
    import pyarrow as pa

    write_manifest(pa.table({"id": ["nope"], "uri": ["u"]}), tmp_path / "m2" / "manifest.parquet")
    with pytest.raises(UserError, match="not in the pool manifest"):
        run_retrieve(tmp / "pool_emb", tmp / "q_small", tmp_path / "m2", tmp / "x", report=False)


def test_centering_subtracts_the_pool_mean_from_pool_and_queries():
    from curation.retrieve import QuerySet, center_embeddings

    rng = np.random.default_rng(6)
    common = np.full(16, 3.0)
    pool = l2_normalise(common + rng.normal(size=(300, 16))).astype(np.float16)
    raw_q = l2_normalise(common + rng.normal(size=(5, 16)))
    qs = QuerySet("q", [f"q{i}" for i in range(5)], raw_q.astype(np.float16))
    before = np.asarray(pool, dtype=np.float32).copy()
    mean = center_embeddings(pool, [qs], chunk=64)  # chunked, in place
    assert np.allclose(mean, before.mean(0), atol=1e-3)
    assert np.allclose(np.linalg.norm(pool.astype(np.float32), axis=1), 1, atol=1e-2)
    # The shared direction is gone: the centred pool's mean is near zero (it was ~0.9 per unit vector).
    assert np.linalg.norm(pool.astype(np.float32).mean(0)) < 0.1 < np.linalg.norm(before.mean(0))
    expect = l2_normalise(raw_q.astype(np.float16).astype(np.float32) - mean)
    assert np.allclose(qs.vectors.astype(np.float32), expect, atol=1e-2)


def test_nothing_retrieved_still_publishes_an_empty_table(pool_dir):
    tmp, _, _ = pool_dir
    m = run_retrieve(tmp / "pool_emb", tmp / "q_small", tmp / "ingest", tmp / "empty", min_queries=100, n_clusters=6)
    t = pq.read_table(tmp / "empty" / "retrieved.parquet")
    assert m["counts"]["retrieved"] == 0 and t.num_rows == 0 and "queries" in t.column_names


@pytest.mark.cuda
def test_gpu_index_and_kmeans_match_cpu():
    if knn.gpu_count() == 0:
        pytest.skip("no usable faiss GPU: faiss-gpu (the `gpu` extra) is absent or has no kernels for this GPU")
    rng = np.random.default_rng(7)
    x = l2_normalise(rng.normal(size=(20_000, 64))).astype(np.float16)
    for spec in ("Flat", "IVF64,SQfp16", "IVF64,PQ16"):
        cpu = knn.build_index(x, spec=spec, nprobe=64, gpu=False)
        gpu = knn.build_index(x, spec=spec, nprobe=64, gpu=True)
        _, a = knn.search(cpu, x[:500], 1)
        _, b = knn.search(gpu, x[:500], 1)
        assert gpu.gpu and np.mean(a[:, 0] == b[:, 0]) > 0.9
    km = kmeans(x, 20, gpu=True)
    assert km.gpu and len(np.unique(km.assignment)) == 20


def test_a_faiss_gpu_build_whose_kernels_abort_falls_back_to_the_cpu(monkeypatch):
    # faiss-gpu-cu12 1.14.1 on an H100 aborts the process at its first kernel; the probe runs in a child.
    knn.gpu_count.cache_clear()
    monkeypatch.setattr(knn, "_faiss_gpus_visible", lambda: 1)
    monkeypatch.setattr(knn, "_PROBE", "import os; os.abort()")
    try:
        with pytest.warns(RuntimeWarning, match="GPU kernels do not run here"):
            assert knn.gpu_count() == 0
        assert knn.resolve_gpu(None) is False
        with pytest.raises(RuntimeError, match="no usable GPU"):
            knn.resolve_gpu(True)
    finally:
        knn.gpu_count.cache_clear()


def test_kmeanspp_seeds_find_small_components_random_seeds_miss():
    from curation.kmeans import kmeanspp_init

    rng = np.random.default_rng(8)
    centers = _centers(rng, 6)
    x, blob = blob_vectors(rng, centers, [2000, 2000, 2000, 60, 60, 60], spread=0.005)
    seeds = kmeanspp_init(x, 6, np.random.default_rng(0))
    nearest = np.argmax(seeds @ centers.T, axis=1)
    assert sorted(nearest.tolist()) == list(range(6))  # one seed per component, small ones included
    def components_found(init):
        km = kmeans(x.astype(np.float16), 6, init=init, seed=0)
        return len({tuple(sorted(set(blob[km.assignment == c].tolist()))) for c in range(6)})

    assert components_found("kmeans++") == 6
    assert components_found("random") < 6  # 6 random seeds almost never land in the three 1% components


def test_cli_bad_inputs_fail_in_one_line(tmp_path, capsys):
    from lvdflow.cli import main

    assert main(["retrieve", "--pool-embeddings", str(tmp_path / "no"), "--pool-manifest", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
    assert "pool embeddings does not exist" in capsys.readouterr().err
    (tmp_path / "emb").mkdir()
    assert main(["retrieve", "--pool-embeddings", str(tmp_path / "emb"), "--pool-manifest", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
    assert "needs --queries" in capsys.readouterr().err
    assert main(["shard", str(tmp_path / "emb"), "--out", str(tmp_path / "o")]) == 2
    assert "neither retrieved.parquet nor manifest.parquet" in capsys.readouterr().err


def test_the_gpu_probe_check_holds_for_a_working_index():
    # The probe's check, run on the CPU index of the same kind, must pass: with an inner-product index of
    # unnormalised vectors it did not (a row's best match need not be itself), so a working faiss GPU build
    # was reported unusable on an H100.
    code = knn._PROBE.replace("faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), 16)", "faiss.IndexFlatL2(16)")
    assert code != knn._PROBE
    exec(code, {})
