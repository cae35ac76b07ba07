"""faiss k-means over L2-normalised embeddings, and batched assignment of any number of points.

faiss trains on at most `max_points_per_centroid * k` points (a random subsample, 256 per centroid by
default), which is what makes k-means over a whole pool affordable; every point is then assigned to its
nearest centroid in batches. Centroids are re-normalised (spherical k-means), so nearest = highest cosine.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from curation.knn import SEARCH_BATCH, iter_batches, resolve_gpu


@dataclass
class KMeansResult:
    centroids: np.ndarray  # float32 [k, d], L2-normalised
    assignment: np.ndarray  # int64 [n], cluster of each input point
    similarity: np.ndarray  # float32 [n], cosine to its centroid
    objective: float  # faiss' final objective (sum of inner products for spherical k-means)
    gpu: bool


KMEANSPP_MAX_K = 2000  # above this, greedy seeding (numpy, CPU) costs more than it saves: faiss' random init


def kmeanspp_init(x: np.ndarray, k: int, rng: np.random.Generator, sample: int | None = None) -> np.ndarray:
    """Greedy k-means++ seeds (D^2 sampling) from a random subsample of x (default 20 points per centroid).

    faiss seeds with k random points, which on uneven data puts several seeds in one big component and
    none in a small one; Lloyd iterations rarely repair that. Cost: O(k * log k * sample * d).
    """
    n = len(x)
    m = min(n, sample or max(20 * k, 1000))
    pts = np.asarray(x[np.sort(rng.choice(n, size=m, replace=False))] if m < n else x, dtype=np.float32)
    seeds = np.empty((k, pts.shape[1]), dtype=np.float32)
    seeds[0] = pts[rng.integers(m)]
    sq = (pts * pts).sum(1)
    d2 = np.maximum(sq - 2 * pts @ seeds[0] + seeds[0] @ seeds[0], 0)
    trials = 2 + int(np.log(k))  # greedy k-means++ (as scikit-learn): best of a few D^2 draws per seed
    for i in range(1, k):
        total = d2.sum()
        if total <= 0:
            cand = rng.integers(m, size=1)
        else:
            cand = np.searchsorted(np.cumsum(d2), rng.random(trials) * total).clip(0, m - 1)
        c = pts[cand]  # [trials, d]
        new_d2 = np.minimum(d2[None, :], np.maximum(sq[None, :] - 2 * c @ pts.T + (c * c).sum(1)[:, None], 0))
        best = int(np.argmin(new_d2.sum(1)))
        seeds[i], d2 = c[best], new_d2[best]
    return seeds


def train_centroids(
    x: np.ndarray,
    k: int,
    *,
    niter: int = 20,
    seed: int = 0,
    gpu: bool | None = None,
    max_points_per_centroid: int = 256,
    init: str = "auto",
) -> tuple[np.ndarray, float, bool]:
    """Train k centroids on x (float16/float32 [n, d]); returns (centroids, objective, used_gpu).

    `init`: "random" (faiss: k random points), "kmeans++" (see kmeanspp_init), or "auto" (k-means++ up to
    KMEANSPP_MAX_K clusters).
    """
    n, d = x.shape
    if k < 1 or k > n:
        raise ValueError(f"k-means needs 1 <= k <= n points, got k={k}, n={n}")
    if init not in ("auto", "random", "kmeans++"):
        raise ValueError(f"init must be auto, random or kmeans++, got {init!r}")
    init_centroids = None
    if k > 1 and (init == "kmeans++" or (init == "auto" and k <= KMEANSPP_MAX_K)):
        init_centroids = kmeanspp_init(x, k, np.random.default_rng(seed))
    use_gpu = resolve_gpu(gpu)
    km = faiss.Kmeans(
        d,
        k,
        niter=niter,
        seed=seed,
        spherical=True,
        gpu=use_gpu,
        max_points_per_centroid=max_points_per_centroid,
        # Fewer than 39 points per centroid is legitimate here (small pools, resampling steps).
        min_points_per_centroid=1,
        verbose=False,
    )
    # faiss samples the training points itself but needs them in one float32 array: sample first so a
    # large float16 pool is never converted whole.
    limit = max_points_per_centroid * k
    if n > limit:
        rng = np.random.default_rng(seed)
        x = x[np.sort(rng.choice(n, size=limit, replace=False))]
    km.train(np.ascontiguousarray(x, dtype=np.float32), init_centroids=None if init_centroids is None else np.ascontiguousarray(init_centroids, dtype=np.float32))
    obj = float(km.obj[-1]) if len(km.obj) else float("nan")
    return np.ascontiguousarray(km.centroids, dtype=np.float32), obj, use_gpu


def assign(x: np.ndarray, centroids: np.ndarray, *, gpu: bool | None = None, batch: int = SEARCH_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (by cosine) of every row of x: (assignment int64 [n], similarity float32 [n])."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    if resolve_gpu(gpu):
        index = faiss.index_cpu_to_all_gpus(index)
    labels = np.empty(len(x), dtype=np.int64)
    sims = np.empty(len(x), dtype=np.float32)
    for start, xb in iter_batches(x, batch):
        s, i = index.search(xb, 1)
        labels[start : start + len(xb)] = i[:, 0]
        sims[start : start + len(xb)] = s[:, 0]
    return labels, sims


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    niter: int = 20,
    seed: int = 0,
    gpu: bool | None = None,
    max_points_per_centroid: int = 256,
    init: str = "auto",
) -> KMeansResult:
    """Spherical k-means of x with k clusters, then every point assigned to its nearest centroid."""
    centroids, obj, used_gpu = train_centroids(
        x, k, niter=niter, seed=seed, gpu=gpu, max_points_per_centroid=max_points_per_centroid, init=init
    )
    labels, sims = assign(x, centroids, gpu=used_gpu)
    return KMeansResult(centroids=centroids, assignment=labels, similarity=sims, objective=obj, gpu=used_gpu)


def members_by_cluster(assignment: np.ndarray, k: int) -> list[np.ndarray]:
    """Point indices of each cluster (ascending), from one stable argsort instead of k scans."""
    order = np.argsort(assignment, kind="stable")
    bounds = np.searchsorted(assignment[order], np.arange(k + 1))
    return [order[bounds[c] : bounds[c + 1]] for c in range(k)]
