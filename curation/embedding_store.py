"""On-disk embeddings: L2-normalised float16 rows in `.npy` shards with a parquet index.

Layout of an embedding directory:
    shards/{shard:05d}.npy   float16 [n_i, dim], rows L2-normalised
    index.parquet            id (string), shard (int32), row (int32), in manifest order
The writer appends whole shards, each written to a temporary name and renamed, so a killed run leaves only
complete shards behind; `completed_shards` tells a resuming run where to continue.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SHARD_DIR = "shards"
INDEX = "index.parquet"


def shard_path(root: Path, shard: int) -> Path:
    return Path(root) / SHARD_DIR / f"{shard:05d}.npy"


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def write_shard(root: Path, shard: int, ids: list[str], vectors: np.ndarray) -> None:
    """Write one shard of vectors (normalised here) and its id list, atomically."""
    if len(ids) != len(vectors):
        raise ValueError(f"shard {shard}: {len(ids)} ids for {len(vectors)} vectors")
    path = shard_path(root, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".npy.tmp")
    with open(tmp, "wb") as f:
        np.save(f, l2_normalise(vectors).astype(np.float16))
    ids_tmp = path.with_suffix(".ids.tmp")
    ids_tmp.write_text("\n".join(ids) + ("\n" if ids else ""))
    os.replace(ids_tmp, path.with_suffix(".ids"))
    os.replace(tmp, path)  # the .npy appears last: its presence marks the shard complete


def completed_shards(root: Path) -> list[int]:
    d = Path(root) / SHARD_DIR
    if not d.is_dir():
        return []
    return sorted(int(p.stem) for p in d.glob("*.npy") if p.with_suffix(".ids").is_file())


def write_index(root: Path) -> int:
    """Build index.parquet from the complete shards; returns the row count."""
    ids, shard_col, row_col = [], [], []
    for s in completed_shards(root):
        shard_ids = shard_path(root, s).with_suffix(".ids").read_text().splitlines()
        ids.extend(shard_ids)
        shard_col.extend([s] * len(shard_ids))
        row_col.extend(range(len(shard_ids)))
    table = pa.table(
        {"id": pa.array(ids, pa.string()), "shard": pa.array(shard_col, pa.int32()), "row": pa.array(row_col, pa.int32())}
    )
    pq.write_table(table, Path(root) / INDEX)
    return len(ids)


def read_index(root: Path) -> pa.Table:
    return pq.read_table(Path(root) / INDEX)


def iter_shards(root: Path, mmap: bool = True) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yield (ids, float16 vectors) per shard, in index order, memory-mapped by default."""
    for s in completed_shards(root):
        path = shard_path(root, s)
        ids = path.with_suffix(".ids").read_text().splitlines()
        yield ids, np.load(path, mmap_mode="r" if mmap else None)


def load_embeddings(root: Path, dtype=np.float32) -> tuple[list[str], np.ndarray]:
    """All ids and vectors in index order (for sets that fit in memory; use iter_shards otherwise)."""
    all_ids: list[str] = []
    parts = []
    for ids, vecs in iter_shards(root):
        all_ids.extend(ids)
        parts.append(np.asarray(vecs, dtype=dtype))
    if not parts:
        return [], np.zeros((0, 0), dtype=dtype)
    return all_ids, np.concatenate(parts, axis=0)
