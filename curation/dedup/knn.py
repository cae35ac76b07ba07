"""k-nearest-neighbour candidate pairs with faiss, sized to the data and bounded in memory.

Inner product on unit vectors is cosine similarity. Up to `exact_max` vectors an exact flat index is
used (no approximation error, and brute force is fast enough there). Above it an IVF index with
sqrt(n)-scaled lists is trained on a sample, storing 8-bit scalar-quantised vectors when the flat copy
would not fit the memory budget. Queries run in batches and only pairs above `min_score` are kept, so
memory stays O(index + batch * k), never O(n * k) floats of rejected neighbours. A GPU is used when faiss
sees one.
"""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np

from curation.knn import gpu_count, to_gpu

log = logging.getLogger(__name__)


def build_index(base: np.ndarray, *, kind: str = "auto", exact_max: int = 200_000,
                memory_budget: int = 4 << 30, nprobe: int | None = None, seed: int = 0,
                use_gpu: bool = True) -> tuple[faiss.Index, dict]:
    """An inner-product index over `base` (n, d) float32 rows. Returns the index and what was chosen."""
    n, d = base.shape
    if kind == "auto":
        kind = "flat" if n <= exact_max else "ivf"
    info: dict = {"index": kind, "n": int(n), "dim": int(d)}
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 128
        use_gpu = False  # faiss has no GPU HNSW
    elif kind == "ivf":
        nlist = int(min(max(16, 4 * math.sqrt(n)), n // 39 or 1))
        quant = "SQ8" if n * d * 4 > memory_budget else "Flat"
        index = faiss.index_factory(d, f"IVF{nlist},{quant}", faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        # 40 points per list and 10 k-means iterations: enough for a coarse quantiser (faiss warns
        # below 39 per list), and training stays a small part of the search cost
        train = base[np.sort(rng.choice(n, size=min(n, 40 * nlist), replace=False))]
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = 10
        index.train(np.ascontiguousarray(train))
        ivf.nprobe = nprobe or 16
        info.update(nlist=nlist, storage=quant, nprobe=faiss.extract_index_ivf(index).nprobe)
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    if use_gpu and gpu_count() > 0:  # a faiss-gpu build whose kernels run on the visible device
        index = to_gpu(index, float16=False)
    info["gpu"] = "Gpu" in type(index).__name__
    for start in range(0, n, 262_144):
        index.add(np.ascontiguousarray(base[start:start + 262_144]))
    return index, info


def knn_pairs(index: faiss.Index, queries: np.ndarray, k: int, *, min_score: float,
              exclude_self: bool, batch: int = 16_384) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, cos) for each query i and neighbour j among its k nearest with cos >= min_score.

    With exclude_self, queries are the indexed rows themselves: the self match is dropped and each
    unordered pair is returned once (i < j), keeping the higher of the two directions' scores implied.
    """
    k = max(1, min(k + (1 if exclude_self else 0), index.ntotal))
    out_i, out_j, out_s = [], [], []
    for start in range(0, len(queries), batch):
        q = np.ascontiguousarray(queries[start:start + batch], dtype=np.float32)
        sims, ids = index.search(q, k)
        rows = np.repeat(np.arange(start, start + len(q)), k)
        ids, sims = ids.reshape(-1), sims.reshape(-1)
        keep = (ids >= 0) & (sims >= min_score)
        if exclude_self:
            keep &= ids != rows
        out_i.append(rows[keep])
        out_j.append(ids[keep])
        out_s.append(sims[keep])
    i = np.concatenate(out_i) if out_i else np.zeros(0, np.int64)
    j = np.concatenate(out_j) if out_j else np.zeros(0, np.int64)
    s = np.concatenate(out_s).astype(np.float32) if out_s else np.zeros(0, np.float32)
    if exclude_self and len(i):
        a, b = np.minimum(i, j), np.maximum(i, j)
        # one row per unordered pair; keep its best score
        order = np.lexsort((-s, b, a))
        a, b, s = a[order], b[order], s[order]
        first = np.ones(len(a), bool)
        first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
        i, j, s = a[first], b[first], s[first]
    return i.astype(np.int64), j.astype(np.int64), s
