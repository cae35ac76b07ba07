"""Small on-disk pools for retrieval and shard tests: real image files, a manifest and embeddings."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curation import embedding_store


def blob_vectors(rng: np.random.Generator, centers: np.ndarray, sizes: list[int], spread: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Points around each center (normalised), and the blob label of each."""
    xs, ys = [], []
    for b, n in enumerate(sizes):
        xs.append(centers[b] + spread * rng.normal(size=(n, centers.shape[1])))
        ys.append(np.full(n, b))
    return embedding_store.l2_normalise(np.concatenate(xs)), np.concatenate(ys)


def write_embeddings(root: Path, ids: list[str], vecs: np.ndarray, shard_size: int = 500) -> Path:
    for s, start in enumerate(range(0, len(ids), shard_size)):
        embedding_store.write_shard(root, s, ids[start : start + shard_size], vecs[start : start + shard_size])
    embedding_store.write_index(root)
    return root


def write_images(folder: Path, n: int, rng: np.random.Generator, prefix: str = "img", formats=("PNG", "JPEG")) -> pa.Table:
    """n small image files (alternating formats) and their manifest table (ingest's columns)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        fmt = formats[i % len(formats)]
        ext = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[fmt]
        arr = rng.integers(0, 255, size=(20 + i % 7, 24, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        data = buf.getvalue()
        path = folder / f"{prefix}{i:05d}.{ext}"
        path.write_bytes(data)
        rows.append(
            {
                "id": hashlib.sha1(str(path).encode()).hexdigest()[:16],
                "uri": str(path),
                "source": str(path),
                "member": None,
                "relpath": path.name,
                "sha256": hashlib.sha256(data).hexdigest(),
                "width": 24,
                "height": 20 + i % 7,
                "format": fmt,
                "mode": "RGB",
                "bytes": len(data),
            }
        )
    return pa.Table.from_pylist(rows)


def write_manifest(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path
