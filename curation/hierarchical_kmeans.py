"""Hierarchical k-means with resampling and balanced sampling (Vo et al. 2024, the ssl-data-curation method).

Why: flat k-means puts centroids where the data is dense, so a few dominant concepts get most clusters and
sampling per cluster cannot rebalance the pool. The method instead
1. clusters the points (level 1), then clusters the centroids of level t-1 (level t), bottom-up;
2. within a level, repeats "take the r points closest to each centroid, rerun k-means on that set,
   reassign all inputs" m times, which spreads centroids more uniformly over the data support;
3. samples top-down: a per-cluster budget found by water-filling (sum_i min(x, size_i) = target), recursed
   into the children of each cluster, and at level 1 points drawn at random ("r") or closest to the
   centroid ("c").
This is a faiss re-implementation of the algorithm (the reference code is PyTorch and CC-BY-NC).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from curation.kmeans import assign, members_by_cluster, train_centroids


@dataclass
class Level:
    centroids: np.ndarray  # float32 [k_t, d]
    assignment: np.ndarray  # int64 [n_{t-1}]: cluster of each input of this level (points, or level t-1 clusters)
    similarity: np.ndarray  # float32 [n_{t-1}]: cosine of each input to its centroid


@dataclass
class HierarchicalClusters:
    levels: list[Level] = field(default_factory=list)

    @property
    def n_points(self) -> int:
        return len(self.levels[0].assignment)

    def point_clusters(self, level: int) -> np.ndarray:
        """Cluster id at `level` (0-based) of every point, composing the assignments below it."""
        labels = self.levels[0].assignment
        for t in range(1, level + 1):
            labels = self.levels[t].assignment[labels]
        return labels


def _closest_per_cluster(assignment: np.ndarray, similarity: np.ndarray, k: int, r: int) -> np.ndarray:
    """Indices of the r inputs closest to the centroid in each cluster (fewer where a cluster is smaller)."""
    order = np.lexsort((-similarity, assignment))  # by cluster, then most similar first
    sorted_assign = assignment[order]
    starts = np.searchsorted(sorted_assign, np.arange(k))
    rank = np.arange(len(order)) - starts[sorted_assign]
    return order[rank < r]


def _level(x: np.ndarray, k: int, steps: int, r: int, niter: int, seed: int, gpu: bool | None) -> Level:
    k = min(k, len(x))
    centroids, _, used_gpu = train_centroids(x, k, niter=niter, seed=seed, gpu=gpu)
    labels, sims = assign(x, centroids, gpu=used_gpu)
    # r = 1 keeps one point per cluster: k-means on k points returns them, so the reference skips the loop.
    for step in range(steps if r > 1 else 0):
        picked = _closest_per_cluster(labels, sims, k, r)
        if len(picked) < k:
            break  # fewer resampled points than clusters: k-means is undefined, keep what we have
        # A fresh initialisation, as the reference: started from the current centroids, Lloyd's algorithm
        # stays where it is (each resampled point is already its own centroid's) and nothing spreads out.
        centroids, _, _ = train_centroids(x[picked], k, niter=niter, seed=seed + 1 + step, gpu=used_gpu)
        labels, sims = assign(x, centroids, gpu=used_gpu)
    return Level(centroids=centroids, assignment=labels, similarity=sims)


def hierarchical_kmeans(
    x: np.ndarray,
    n_clusters: list[int],
    *,
    n_resampling_steps: list[int] | None = None,
    sample_size: list[int] | None = None,
    niter: int = 20,
    seed: int = 0,
    gpu: bool | None = None,
) -> HierarchicalClusters:
    """Bottom-up: level 0 clusters x into n_clusters[0]; level t clusters the centroids of level t-1.

    `sample_size[t]` is r, the points per cluster kept in each resampling step (the reference configs use
    about half the average cluster size); `n_resampling_steps[t]` is m, the resampling steps after the first
    k-means. The reference's `n_resampling_steps` counts that first run too: its [1, 10, 10, 10] is [0, 9, 9, 9]
    here.
    """
    if any(b > a for a, b in zip(n_clusters, n_clusters[1:])):
        raise ValueError(f"cluster counts must not grow with the level: {n_clusters}")
    depth = len(n_clusters)
    steps = n_resampling_steps or [0] * depth
    if sample_size is None:
        sizes = [len(x)] + list(n_clusters[:-1])
        sample_size = [max(1, sizes[t] // n_clusters[t] // 2) for t in range(depth)]
    if not (len(steps) == len(sample_size) == depth):
        raise ValueError("n_clusters, n_resampling_steps and sample_size need one entry per level")
    tree = HierarchicalClusters()
    inputs = x
    for t in range(depth):
        level = _level(inputs, n_clusters[t], steps[t], sample_size[t], niter, seed + 1000 * t, gpu)
        tree.levels.append(level)
        inputs = level.centroids
    return tree


def water_fill(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Budgets b_i <= size_i with sum b_i = min(target, sum size_i), as equal as the sizes allow.

    Binary search for the largest cap x with sum min(x, size_i) <= target, then hand the remainder out one
    by one to random clusters that still have room (the ssl-data-curation "best cut" rule).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    if target >= total:
        return sizes.copy()
    lo, hi = 0, int(sizes.max())
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(np.minimum(sizes, mid).sum()) <= target:
            lo = mid
        else:
            hi = mid - 1
    budgets = np.minimum(sizes, lo)
    rest = target - int(budgets.sum())
    if rest > 0:
        room = np.flatnonzero(sizes > budgets)
        budgets[rng.choice(room, size=rest, replace=False)] += 1
    return budgets


def balanced_sample(
    tree: HierarchicalClusters, target_size: int, *, strategy: str = "r", seed: int = 0
) -> np.ndarray:
    """Point indices (sorted) chosen top-down so that every cluster at every level gets an even share."""
    if strategy not in ("r", "c"):
        raise ValueError(f"sampling strategy must be 'r' (random) or 'c' (closest to centroid), got {strategy!r}")
    rng = np.random.default_rng(seed)
    depth = len(tree.levels)
    # children[t][c]: inputs of level t (level t-1 clusters, or points at t=0) that belong to cluster c.
    children = [members_by_cluster(lv.assignment, len(lv.centroids)) for lv in tree.levels]
    # Points under each cluster of each level, bottom-up.
    point_counts = [np.bincount(tree.levels[0].assignment, minlength=len(tree.levels[0].centroids))]
    for t in range(1, depth):
        lv = tree.levels[t]
        point_counts.append(np.bincount(lv.assignment, weights=point_counts[t - 1], minlength=len(lv.centroids)).astype(np.int64))
    picked: list[np.ndarray] = []

    def descend(t: int, clusters: np.ndarray, budget: int) -> None:
        budgets = water_fill(point_counts[t][clusters], budget, rng)
        for c, b in zip(clusters, budgets):
            if b == 0:
                continue
            if t == 0:
                members = children[0][c]
                if strategy == "r":
                    picked.append(rng.choice(members, size=int(b), replace=False))
                else:
                    sims = tree.levels[0].similarity[members]
                    picked.append(members[np.argsort(-sims, kind="stable")[: int(b)]])
            else:
                descend(t - 1, children[t][c], int(b))

    top = np.arange(len(tree.levels[-1].centroids))
    descend(depth - 1, top, int(target_size))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)
