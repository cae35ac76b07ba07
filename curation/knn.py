"""faiss nearest-neighbour search over L2-normalised embeddings (cosine = inner product).

The index type is chosen by pool size, as in the DINOv2 curation (exact search while it is cheap, inverted
files above that, product quantisation when the raw vectors would not fit in GPU/CPU memory):

    n <= flat_max            "Flat"             exact, no training
    n <= ivf_flat_max        "IVF{nlist},SQfp16" vectors kept as float16: exactly what the embedding store
                                                holds, at half the memory of IVF,Flat (3 GB -> 1.5 GB at 1M x 768)
    larger                   "IVF{nlist},PQ{m}" m bytes per vector

Indexes are moved to every visible GPU when faiss was built with GPU support (faiss-gpu); the CPU build
runs the same code on the CPU.
"""

from __future__ import annotations

import functools
import math
import subprocess
import sys
import warnings
from dataclasses import dataclass
from typing import Iterable

import faiss
import numpy as np

FLAT_MAX = 200_000
IVF_FLAT_MAX = 5_000_000
SEARCH_BATCH = 16_384


_PROBE = """
import faiss, numpy as np
x = np.random.default_rng(0).normal(size=(256, 16)).astype("float32")
index = faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), 16)  # L2: each row's nearest is itself
index.add(x)
assert index.search(x[:4], 1)[1][:, 0].tolist() == [0, 1, 2, 3]
"""


def _faiss_gpus_visible() -> int:
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # a faiss-gpu build on a machine without a driver
        return 0


@functools.lru_cache(maxsize=1)
def gpu_count() -> int:
    """GPUs faiss can use: 0 with the faiss-cpu build, whatever CUDA sees with faiss-gpu, and 0 when the
    faiss-gpu build has no kernels for this GPU.

    The last case is real: the PyPI faiss-gpu-cu12 1.14.1 wheel carries no kernels for H100s (sm_90) and
    its first GPU kernel then *aborts the process* ("no kernel image is available", a C++ assertion that
    Python cannot catch). So a tiny search runs once in a child process first; if it dies, faiss runs on
    the CPU here, with a warning saying why.
    """
    n = _faiss_gpus_visible()
    if n == 0:
        return 0
    probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        detail = (probe.stderr.strip().splitlines() or ["no output"])[-1][:300]
        warnings.warn(f"faiss sees {n} GPU(s) but its GPU kernels do not run here, so faiss runs on the CPU "
                      f"(exit code {probe.returncode}: {detail})", RuntimeWarning, stacklevel=2)
        return 0
    return n


def resolve_gpu(gpu: bool | None) -> bool:
    """`None` means "when present"; `True` without a usable GPU build is a configuration error, said clearly."""
    n = gpu_count()
    if gpu is None:
        return n > 0
    if gpu and n == 0:
        raise RuntimeError("gpu=True but faiss has no usable GPU (install faiss-gpu built for this GPU, check CUDA)")
    return bool(gpu)


def _pq_m(d: int) -> int:
    # Largest sub-quantiser count that divides d, capped at 64 bytes/vector; GPU IVFPQ accepts all of these.
    for m in (64, 48, 32, 24, 16, 8, 4, 2, 1):
        if d % m == 0 and m <= d:
            return m
    return 1


def nlist_for(n: int, gpu: bool = False) -> int:
    """Inverted lists for n vectors, a power of two with at least 39 training points per list.

    faiss suggests 4-16 sqrt(n) lists; training the coarse quantiser costs ~ n_train * nlist * d, i.e.
    grows with nlist squared at a fixed points-per-list, which a GPU absorbs and a CPU does not. So: 4 sqrt(n)
    on GPU, sqrt(n) on CPU (then searched with a proportionally larger share of lists per probe).
    """
    nlist = 2 ** round(math.log2(max(1.0, (4 if gpu else 1) * math.sqrt(n))))
    return int(max(1, min(nlist, n // 39)))


def choose_index_spec(n: int, d: int, flat_max: int = FLAT_MAX, ivf_flat_max: int = IVF_FLAT_MAX, gpu: bool = False) -> str:
    """A faiss index_factory string suited to n vectors of dimension d."""
    if n <= flat_max:
        return "Flat"
    nlist = nlist_for(n, gpu)
    if n <= ivf_flat_max:
        return f"IVF{nlist},SQfp16"
    return f"IVF{nlist},PQ{_pq_m(d)}"


@dataclass
class KnnIndex:
    index: faiss.Index
    spec: str
    gpu: bool
    ntotal: int


def _as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def to_gpu(index: faiss.Index, *, float16: bool = True) -> faiss.Index:
    """`index` cloned onto every GPU faiss can use, its database split over them (not replicated).

    `float16`: half-precision storage and lookup tables (GPU IVF-PQ with more than 48 sub-quantisers needs
    them: shared memory limit). Retrieval takes them; copy detection does not (its scores meet a threshold).
    """
    if faiss.get_num_gpus() == 1:
        co = faiss.GpuClonerOptions()
        co.useFloat16 = float16
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index, co)
    co = faiss.GpuMultipleClonerOptions()
    co.useFloat16 = float16
    co.shard = True
    return faiss.index_cpu_to_all_gpus(index, co=co)


def build_index(
    vectors: np.ndarray,
    *,
    spec: str = "auto",
    nprobe: int = 32,
    gpu: bool | None = None,
    seed: int = 0,
    train_points: int | None = None,
    add_batch: int = 262_144,
    flat_max: int = FLAT_MAX,
    ivf_flat_max: int = IVF_FLAT_MAX,
) -> KnnIndex:
    """An inner-product index over `vectors` (float16 or float32, rows L2-normalised).

    Trained on a random sample (faiss needs ~39-256 points per list) and filled in batches, so the float32
    copy alive at any time is one batch, not the whole pool.
    """
    n, d = vectors.shape
    use_gpu = resolve_gpu(gpu)
    if spec == "auto":
        spec = choose_index_spec(n, d, flat_max, ivf_flat_max, gpu=use_gpu)
    index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    if "PQ" in spec:
        # Polysemous training (codes ordered for Hamming pre-filtering) is only used by polysemous search,
        # which we never run, and it dominates training time (7x on a 8k x 32-d set).
        try:
            faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
        except (AttributeError, RuntimeError):
            pass
    if not index.is_trained:
        nlist = faiss.extract_index_ivf(index).nlist
        # 64 points per list is within faiss' 39-256 advice and keeps CPU training to a minute at 1M x 768.
        want = train_points or min(n, max(64 * nlist, 65_536))
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, want), replace=False))
        train = _as_f32(vectors[sample])
        if use_gpu:
            # Train the coarse quantiser on the GPU, the slow part for large nlist.
            ivf = faiss.extract_index_ivf(index)
            clus = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(d))
            ivf.clustering_index = clus
        index.train(train)
    if "IVF" in spec:
        # Set on the CPU index: cloning to GPU copies nprobe (GPU indexes need GpuParameterSpace otherwise).
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    if use_gpu:
        index = to_gpu(index)  # empty but trained: the vectors are added on the GPU, batch by batch
    for start in range(0, n, add_batch):
        index.add(_as_f32(vectors[start : start + add_batch]))
    return KnnIndex(index=index, spec=spec, gpu=use_gpu, ntotal=n)


def search(index: KnnIndex | faiss.Index, queries: np.ndarray, k: int, batch: int = SEARCH_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """(similarities [nq, k] float32, ids [nq, k] int64); ids are -1 where fewer than k exist."""
    idx = index.index if isinstance(index, KnnIndex) else index
    nq = len(queries)
    sims = np.empty((nq, k), dtype=np.float32)
    ids = np.empty((nq, k), dtype=np.int64)
    for start in range(0, nq, batch):
        s, i = idx.search(_as_f32(queries[start : start + batch]), k)
        sims[start : start + batch] = s
        ids[start : start + batch] = i
    return sims, ids


def iter_batches(x: np.ndarray, batch: int) -> Iterable[tuple[int, np.ndarray]]:
    for start in range(0, len(x), batch):
        yield start, _as_f32(x[start : start + batch])
