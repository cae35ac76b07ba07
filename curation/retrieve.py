"""Retrieval curation (DINOv2 LVD-142M, App. A.4): curated query sets pull their neighbours out of the pool.

Per query set (one embedding directory = one curated source), the mode is chosen by its size:
- sample-based (large sets, >= `sample_threshold` queries): the k nearest pool images of every query
  (k = 4 in DINOv2), from a faiss index chosen by pool size (flat / IVF / IVF-PQ, see curation.knn);
- cluster-based (small sets): the pool is clustered with faiss k-means; every cluster holding more than
  `min_queries` of the set's queries contributes up to `per_cluster` of its images, and the set as a whole
  is capped at `per_source_cap` images;
- balanced (no queries needed): hierarchical k-means with resampling, then balanced sampling of
  `target_size` images (the ssl-data-curation method).
An image retrieved by several queries (a "collision") is kept once, with every query that chose it, the
query's set and its cosine distance (1 - cosine similarity).

Outputs (`run_retrieve`): retrieved.parquet (pool manifest columns + cluster, query_sets, queries, distances,
min_distance), pool_clusters.parquet and centroids.npy when the pool was clustered, and report/ (curation
report with image grids).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import embedding_store, knn
from curation.hierarchical_kmeans import balanced_sample, hierarchical_kmeans
from curation.kmeans import assign, kmeans, members_by_cluster
from lvdflow.errors import UserError
from lvdflow.parts import MapUnits
from lvdflow.stage import file_digest, publish, work_dir

log = logging.getLogger(__name__)

RETRIEVED = "retrieved.parquet"
POOL_CLUSTERS = "pool_clusters.parquet"
CENTROIDS = "centroids.npy"
MODES = ("auto", "sample", "cluster", "balanced")


@dataclass
class QuerySet:
    name: str
    ids: list[str]
    vectors: np.ndarray  # float16 [n, d], L2-normalised


@dataclass
class Pairs:
    """(pool image, query) pairs before collisions are merged; query is an index into the global query list."""

    pool: np.ndarray  # int64
    query: np.ndarray  # int64, -1 = no query (balanced sampling)
    distance: np.ndarray  # float32, 1 - cosine

    @staticmethod
    def empty() -> "Pairs":
        return Pairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))

    @staticmethod
    def concat(parts: Sequence["Pairs"]) -> "Pairs":
        if not parts:
            return Pairs.empty()
        return Pairs(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("pool", "query", "distance")))


# ---------------------------------------------------------------- the two retrieval rules (pure arrays)


def sample_based(index: knn.KnnIndex, queries: np.ndarray, k: int, query_offset: int = 0,
                 search_batch: int = knn.SEARCH_BATCH) -> Pairs:
    """The k nearest pool images of every query."""
    sims, ids = knn.search(index, queries, k, batch=search_batch)
    return _hits_to_pairs(sims, ids, k, query_offset)


INDEX_FILE = "pool.faiss"
_LOADED: dict[tuple, object] = {}


def search_unit(index_path: str, queries_path: str, k: int, search_batch: int, rows: tuple[int, int]
                ) -> tuple[np.ndarray, np.ndarray]:
    """One unit of sample-based retrieval for another executor: queries[rows] against the saved index
    (read once per process)."""
    import faiss

    st = os.stat(index_path)
    key = (index_path, st.st_mtime_ns, st.st_size)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = faiss.read_index(index_path)
    queries = np.load(queries_path, mmap_mode="r")
    return knn.search(_LOADED[key], queries[rows[0]:rows[1]], k, batch=search_batch)


def sample_based_units(index: knn.KnnIndex, queries: np.ndarray, k: int, query_offset: int, work: Path,
                       map_units: MapUnits, query_chunk: int, search_batch: int = knn.SEARCH_BATCH) -> Pairs:
    """`sample_based` with the search split into chunks of queries run by `map_units`. Chunks are whole
    multiples of `search_batch`, so every faiss call sees the rows it sees in `sample_based`."""
    import faiss

    index_path = work / INDEX_FILE
    if not index_path.is_file():
        cpu = faiss.index_gpu_to_cpu(index.index) if index.gpu else index.index
        faiss.write_index(cpu, str(index_path) + ".tmp")
        os.replace(str(index_path) + ".tmp", index_path)
    queries_path = work / f"queries-{query_offset}.npy"
    np.save(queries_path, queries)
    chunk = max(1, -(-query_chunk // search_batch)) * search_batch
    rows = [(s, min(len(queries), s + chunk)) for s in range(0, len(queries), chunk)]
    hits = map_units(partial(search_unit, str(index_path), str(queries_path), k, search_batch), rows)
    queries_path.unlink()
    sims = np.concatenate([h[0] for h in hits]) if hits else np.zeros((0, k), np.float32)
    ids = np.concatenate([h[1] for h in hits]) if hits else np.zeros((0, k), np.int64)
    return _hits_to_pairs(sims, ids, k, query_offset)


def _hits_to_pairs(sims: np.ndarray, ids: np.ndarray, k: int, query_offset: int) -> Pairs:
    q = np.repeat(np.arange(len(ids), dtype=np.int64) + query_offset, k)
    p = ids.reshape(-1)
    keep = p >= 0  # faiss pads with -1 when an IVF probe finds fewer than k
    return Pairs(p[keep], q[keep], (1.0 - sims.reshape(-1)[keep]).astype(np.float32))


def cluster_based(
    pool: np.ndarray,
    members: list[np.ndarray],
    pool_similarity: np.ndarray,
    query_clusters: np.ndarray,
    queries: np.ndarray,
    *,
    min_queries: int = 3,
    per_cluster: int = 10_000,
    per_source_cap: int | None = 1_000_000,
    selection: str = "random",
    max_listed_queries: int = 8,
    rng: np.random.Generator,
    query_offset: int = 0,
) -> tuple[Pairs, list[int]]:
    """Images of the clusters holding more than `min_queries` queries; returns (pairs, chosen clusters).

    Each image is listed with (up to `max_listed_queries` of) the nearest queries of its cluster, so the
    output says which queries pulled it in without storing a cluster-sized query list per image.
    """
    k = len(members)
    counts = np.bincount(query_clusters, minlength=k)
    chosen = np.flatnonzero(counts > min_queries)
    q_members = members_by_cluster(query_clusters, k)
    picks: list[tuple[int, np.ndarray]] = []
    for c in chosen:
        m = members[c]
        if len(m) > per_cluster:
            if selection == "closest":
                m = m[np.argsort(-pool_similarity[m], kind="stable")[:per_cluster]]
            else:
                m = np.sort(rng.choice(m, size=per_cluster, replace=False))
        if len(m):
            picks.append((int(c), m))
    total = sum(len(m) for _, m in picks)
    if per_source_cap is not None and total > per_source_cap:
        # The cap is drawn uniformly over the set's retrieved images, so every chosen cluster shrinks alike.
        keep = np.zeros(total, dtype=bool)
        keep[rng.choice(total, size=per_source_cap, replace=False)] = True
        out, start = [], 0
        for c, m in picks:
            out.append((c, m[keep[start : start + len(m)]]))
            start += len(m)
        picks = [(c, m) for c, m in out if len(m)]
    parts = []
    for c, m in picks:
        qs = q_members[c]
        sims = np.asarray(pool[m], dtype=np.float32) @ np.asarray(queries[qs], dtype=np.float32).T  # [|m|, |qs|]
        n_list = min(max_listed_queries, len(qs))
        top = np.argsort(-sims, axis=1, kind="stable")[:, :n_list]
        parts.append(
            Pairs(
                np.repeat(m.astype(np.int64), n_list),
                (qs[top] + query_offset).reshape(-1).astype(np.int64),
                (1.0 - np.take_along_axis(sims, top, axis=1)).reshape(-1).astype(np.float32),
            )
        )
    return Pairs.concat(parts), [int(c) for c in chosen]


def merge_collisions(pairs: Pairs) -> tuple[np.ndarray, np.ndarray, Pairs]:
    """Group pairs by pool image: (unique pool indices, list offsets, pairs sorted by image then distance).

    Duplicate (image, query) pairs (the same query listed twice for one image) are dropped.
    """
    order = np.lexsort((pairs.distance, pairs.query, pairs.pool))
    p, q, d = pairs.pool[order], pairs.query[order], pairs.distance[order]
    dup = np.zeros(len(p), dtype=bool)
    dup[1:] = (p[1:] == p[:-1]) & (q[1:] == q[:-1])
    p, q, d = p[~dup], q[~dup], d[~dup]
    order = np.lexsort((d, p))  # within an image: nearest query first
    p, q, d = p[order], q[order], d[order]
    uniq, starts = np.unique(p, return_index=True)
    offsets = np.append(starts, len(p)).astype(np.int32)
    return uniq, offsets, Pairs(p, q, d)


# ---------------------------------------------------------------- inputs


def load_query_sets(dirs: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[QuerySet]:
    """One query set per embedding directory, named by the directory (made unique when names repeat)."""
    if dirs is None:
        return []
    if isinstance(dirs, (str, os.PathLike)):
        dirs = [dirs]
    sets, seen = [], {}
    for d in dirs:
        d = Path(d)
        if not embedding_store.completed_shards(d):
            raise UserError(f"query embeddings not found in {d} (expected {embedding_store.SHARD_DIR}/*.npy)")
        ids, vecs = embedding_store.load_embeddings(d, dtype=np.float16)
        name = d.name
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}#{seen[name]}"
        sets.append(QuerySet(name=name, ids=ids, vectors=vecs))
    return sets


def _load_pool(pool_dir: Path) -> tuple[list[str], np.ndarray]:
    if not embedding_store.completed_shards(pool_dir):
        raise UserError(f"pool embeddings not found in {pool_dir} (expected {embedding_store.SHARD_DIR}/*.npy)")
    ids, vecs = embedding_store.load_embeddings(pool_dir, dtype=np.float16)
    if len(ids) == 0:
        raise UserError(f"the pool embeddings in {pool_dir} are empty")
    return ids, vecs


def _read_manifest(path: Path) -> pa.Table:
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.parquet"
    if not p.is_file():
        raise UserError(f"no pool manifest at {path} (expected manifest.parquet or a directory holding it)")
    table = pq.read_table(p)
    if "id" not in table.column_names:
        raise UserError(f"pool manifest {p} has no 'id' column")
    return table


def center_embeddings(pool: np.ndarray, sets: list[QuerySet], chunk: int = 262_144) -> np.ndarray:
    """Subtract the pool mean from pool and queries, then re-normalise (in place for the pool, by chunks).

    Embeddings from a weak or untrained model share a large common component, so every query's nearest
    neighbours are the same few "hub" images; centring removes it (SSCD recommends it for its descriptors).
    """
    mean = np.zeros(pool.shape[1], dtype=np.float64)
    for s in range(0, len(pool), chunk):
        mean += np.asarray(pool[s : s + chunk], dtype=np.float64).sum(axis=0)
    mean = (mean / len(pool)).astype(np.float32)
    for s in range(0, len(pool), chunk):
        pool[s : s + chunk] = embedding_store.l2_normalise(np.asarray(pool[s : s + chunk], dtype=np.float32) - mean)
    for qs in sets:
        qs.vectors = embedding_store.l2_normalise(np.asarray(qs.vectors, dtype=np.float32) - mean).astype(np.float16)
    return mean


def default_n_clusters(n: int) -> int:
    """~100 images per cluster, at most 100k clusters (the DINOv2 count for a 1.2B pool)."""
    return int(max(1, min(100_000, n // 100)))


# ---------------------------------------------------------------- the stage


def run_retrieve(
    pool_embeddings_dir: str | os.PathLike,
    query_embeddings_dir: str | os.PathLike | Sequence[str | os.PathLike] | None,
    pool_manifest: str | os.PathLike,
    out: str | os.PathLike,
    *,
    mode: str = "auto",
    sample_threshold: int = 1_000_000,
    k: int = 4,
    n_clusters: int | None = None,
    clustering: str = "kmeans",
    hierarchical_levels: Sequence[int] | None = None,
    resampling_steps: Sequence[int] | None = None,
    min_queries: int = 3,
    per_cluster: int = 10_000,
    per_source_cap: int | None = 1_000_000,
    selection: str = "random",
    target_size: int | None = None,
    balanced_strategy: str = "r",
    max_listed_queries: int = 8,
    index_spec: str = "auto",
    nprobe: int = 32,
    kmeans_iters: int = 20,
    kmeans_init: str = "auto",
    assign_clusters: bool = True,
    gpu: bool | None = None,
    seed: int = 0,
    query_manifests: Sequence[str | os.PathLike] | None = None,
    report: bool = True,
    center: bool = False,
    map_units: MapUnits | None = None,
    query_chunk: int = 65_536,
    search_batch: int = knn.SEARCH_BATCH,
) -> dict:
    """Retrieve pool images for the query sets and write retrieved.parquet (see module docstring).

    `clustering="hierarchical"` clusters the pool with hierarchical k-means (levels `hierarchical_levels`,
    finest first; default [n_clusters, n_clusters // 10]) and uses its finest level as the clusters.
    `assign_clusters` clusters the pool even when every set is sample-based, so `cluster` is filled in.
    `center` subtracts the pool mean from pool and queries first (see `center_embeddings`).
    `kmeans_init`: "auto" (greedy k-means++ seeds up to 2000 clusters, faiss' random seeds above), "random",
    "kmeans++".
    `map_units` (lvdflow/parts.py) runs the kNN search of sample-mode query sets elsewhere, in chunks of
    `query_chunk` queries against the index saved in the work directory; k-means stays here (faiss spreads
    it over the cores or GPUs).
    """
    out = Path(out)
    if mode not in MODES:
        raise UserError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if clustering not in ("kmeans", "hierarchical"):
        raise UserError(f"clustering must be 'kmeans' or 'hierarchical', got {clustering!r}")
    if selection not in ("random", "closest"):
        raise UserError(f"selection must be 'random' or 'closest', got {selection!r}")
    if k < 1 or min_queries < 0 or per_cluster < 1:
        raise UserError("k and per_cluster must be >= 1 and min_queries >= 0")
    t0 = time.perf_counter()
    pool_ids, pool = _load_pool(Path(pool_embeddings_dir))
    # Balanced sampling is query-free: query sets given with it are ignored (and said so in stage.json).
    sets = load_query_sets(query_embeddings_dir) if mode != "balanced" else []
    if mode != "balanced" and not sets:
        raise UserError(f"mode {mode!r} needs query embeddings (only mode 'balanced' works without)")
    if mode == "balanced" and not target_size:
        raise UserError("mode 'balanced' needs target_size (how many images to sample)")
    for s in sets:
        if s.vectors.shape[1] != pool.shape[1]:
            raise UserError(f"query set {s.name} has dimension {s.vectors.shape[1]}, the pool {pool.shape[1]}")
    manifest_table = _read_manifest(Path(pool_manifest))
    if center:
        center_embeddings(pool, sets)
    timings: dict[str, float] = {"load": time.perf_counter() - t0}

    set_modes = {s.name: (mode if mode != "auto" else ("sample" if len(s.ids) >= sample_threshold else "cluster")) for s in sets}
    need_clusters = mode == "balanced" or "cluster" in set_modes.values() or assign_clusters
    rng = np.random.default_rng(seed)
    work = work_dir(out, fresh=True)

    # ---- cluster the pool once, shared by every cluster-based set
    labels = pool_sim = centroids = None
    tree = None
    k_clusters = min(n_clusters or default_n_clusters(len(pool_ids)), len(pool_ids))
    used_gpu = knn.resolve_gpu(gpu)
    if need_clusters:
        t = time.perf_counter()
        if clustering == "hierarchical" or mode == "balanced":
            levels = list(hierarchical_levels or [k_clusters, max(1, k_clusters // 10)])
            levels = [min(c, len(pool_ids)) for c in levels]
            tree = hierarchical_kmeans(
                pool, levels, n_resampling_steps=list(resampling_steps) if resampling_steps else [2] * len(levels),
                niter=kmeans_iters, seed=seed, gpu=gpu,
            )
            lv = tree.levels[0]
            centroids, labels, pool_sim = lv.centroids, lv.assignment, lv.similarity
        else:
            km = kmeans(pool, k_clusters, niter=kmeans_iters, seed=seed, gpu=gpu, init=kmeans_init)
            centroids, labels, pool_sim = km.centroids, km.assignment, km.similarity
        k_clusters = len(centroids)
        timings["cluster_pool"] = time.perf_counter() - t
        np.save(work / CENTROIDS, centroids)
        pq.write_table(
            pa.table({"id": pa.array(pool_ids, pa.string()), "cluster": pa.array(labels, pa.int64()), "similarity": pa.array(pool_sim, pa.float32())}),
            work / POOL_CLUSTERS,
        )
    members = members_by_cluster(labels, k_clusters) if labels is not None else None

    # ---- retrieve per query set
    index = None
    parts: list[Pairs] = []
    per_set: dict[str, dict] = {}
    query_labels: list[str] = []
    query_set_of: list[int] = []
    for si, s in enumerate(sets):
        offset = len(query_labels)
        query_labels.extend(s.ids)
        query_set_of.extend([si] * len(s.ids))
        t = time.perf_counter()
        if set_modes[s.name] == "sample":
            if index is None:
                ti = time.perf_counter()
                index = knn.build_index(pool, spec=index_spec, nprobe=nprobe, gpu=gpu, seed=seed)
                timings["build_index"] = time.perf_counter() - ti
            if map_units is None:
                pairs = sample_based(index, s.vectors, min(k, len(pool_ids)), query_offset=offset,
                                     search_batch=search_batch)
            else:
                pairs = sample_based_units(index, s.vectors, min(k, len(pool_ids)), offset, work, map_units,
                                           query_chunk, search_batch)
            info = {"mode": "sample", "queries": len(s.ids), "k": k}
        else:
            q_labels, _ = assign(s.vectors, centroids, gpu=gpu)
            pairs, chosen = cluster_based(
                pool, members, pool_sim, q_labels, s.vectors,
                min_queries=min_queries, per_cluster=per_cluster, per_source_cap=per_source_cap,
                selection=selection, max_listed_queries=max_listed_queries, rng=rng, query_offset=offset,
            )
            info = {"mode": "cluster", "queries": len(s.ids), "clusters_chosen": len(chosen)}
        info["images"] = int(len(np.unique(pairs.pool)))
        info["seconds"] = round(time.perf_counter() - t, 3)
        per_set[s.name] = info
        parts.append(pairs)
    if mode == "balanced":
        t = time.perf_counter()
        picked = balanced_sample(tree, int(target_size), strategy=balanced_strategy, seed=seed)
        parts.append(Pairs(picked.astype(np.int64), np.full(len(picked), -1, np.int64), (1.0 - pool_sim[picked]).astype(np.float32)))
        per_set["balanced"] = {"mode": "balanced", "images": int(len(picked)), "seconds": round(time.perf_counter() - t, 3)}

    t = time.perf_counter()
    (work / INDEX_FILE).unlink(missing_ok=True)  # scratch of sample_based_units
    uniq, offsets, merged = merge_collisions(Pairs.concat(parts))
    table = _retrieved_table(uniq, offsets, merged, pool_ids, manifest_table, labels, query_labels, query_set_of, [s.name for s in sets])
    pq.write_table(table, work / RETRIEVED)
    timings["write"] = time.perf_counter() - t
    n_queries_per_image = np.diff(offsets)
    counts = {
        "pool": len(pool_ids),
        "queries": len(query_labels),
        "pairs": int(len(merged.pool)),
        "retrieved": int(len(uniq)),
        "collisions": int((n_queries_per_image > 1).sum()),
        "clusters": int(k_clusters) if labels is not None else 0,
    }
    if report and len(uniq):
        from curation.retrieve_report import write_report  # matplotlib/PIL only when a report is wanted

        try:
            write_report(work, table, pool_manifest_table=manifest_table, query_manifests=query_manifests, seed=seed)
        except Exception as exc:  # a report must never lose the retrieval itself
            log.warning("curation report failed: %s", exc)
            (work / "report").mkdir(exist_ok=True)
            (work / "report" / "report.md").write_text(f"# Curation report\n\nReport generation failed: {exc}\n")
    timings["total"] = time.perf_counter() - t0
    manifest = {
        "stage": "retrieve",
        "params": {
            "mode": mode, "sample_threshold": sample_threshold, "k": k, "n_clusters": k_clusters if labels is not None else None,
            "clustering": clustering, "min_queries": min_queries, "per_cluster": per_cluster,
            "per_source_cap": per_source_cap, "selection": selection, "target_size": target_size,
            "index_spec": index.spec if index is not None else index_spec, "nprobe": nprobe,
            "kmeans_iters": kmeans_iters, "kmeans_init": kmeans_init, "seed": seed, "center": center,
        },
        "gpu": used_gpu,
        "counts": counts,
        "query_sets": per_set,
        "timings_s": {k_: round(v, 3) for k_, v in timings.items()},
        "outputs": {"retrieved": RETRIEVED, "pool_clusters": POOL_CLUSTERS if labels is not None else None, "report": "report/report.md"},
        "digest": file_digest(work / RETRIEVED),
    }
    return publish(work, out, manifest)


def _retrieved_table(
    uniq: np.ndarray,
    offsets: np.ndarray,
    merged: Pairs,
    pool_ids: list[str],
    manifest_table: pa.Table,
    labels: np.ndarray | None,
    query_labels: list[str],
    query_set_of: list[int],
    set_names: list[str],
) -> pa.Table:
    ids = pa.array([pool_ids[i] for i in uniq], pa.string())
    rows = pc.index_in(ids, value_set=manifest_table["id"])
    missing = pc.is_null(rows)
    if pc.any(missing).as_py():
        bad = pc.filter(ids, missing)
        raise UserError(
            f"{len(bad)} retrieved pool ids are not in the pool manifest (e.g. {bad[0].as_py()}): "
            "the embeddings and the manifest come from different ingests"
        )
    table = manifest_table.take(rows)
    has_query = merged.query >= 0
    qlab = np.array(query_labels + [""], dtype=object)
    qset_names = np.array(set_names + [""], dtype=object)
    qset_idx = np.append(np.asarray(query_set_of, dtype=np.int64), len(set_names))
    qi = np.where(has_query, merged.query, len(query_labels))
    # Balanced picks carry no query: keep their distance to the centroid but list no query.
    keep = has_query
    new_offsets = np.concatenate([[0], np.cumsum(np.add.reduceat(keep.astype(np.int64), offsets[:-1]) if len(uniq) else [])]).astype(np.int32)
    values_q = pa.array(qlab[qi[keep]], pa.string())
    values_s = pa.array(qset_names[qset_idx[qi[keep]]], pa.string())
    values_d = pa.array(merged.distance[keep], pa.float32())
    off = pa.array(new_offsets, pa.int32())
    cluster = pa.array(labels[uniq] if labels is not None else np.full(len(uniq), -1), pa.int64())
    extra = {
        "cluster": cluster,
        "query_sets": pa.ListArray.from_arrays(off, values_s),
        "queries": pa.ListArray.from_arrays(off, values_q),
        "distances": pa.ListArray.from_arrays(off, values_d),
        # Balanced picks have no query; their distance to the cluster centroid is kept here instead.
        "min_distance": pa.array(np.minimum.reduceat(merged.distance, offsets[:-1]) if len(uniq) else np.zeros(0, np.float32), pa.float32()),
    }
    for name, col in extra.items():
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(name, col)
    return table
