"""WebDataset tar shards of the curated images: original bytes, metadata json, parquet indexes.

Layout of a shard directory (img2dataset / webdataset conventions):
    {shard:06d}.tar       one sample per image: <key>.<ext> (the original file bytes, never re-encoded,
                          except images with face boxes, which are stored blurred and re-encoded) and <key>.json
    {shard:06d}.parquet   index of the shard (key, id, uri, ext, sha256 of the stored bytes, ...); written
                          after the tar is renamed into place, so its presence marks the shard complete
    index.parquet         all shard indexes, with a `shard` column
    errors.parquet        rows that could not be written (unreadable source, changed bytes), with reasons
    stats.json            counts and sizes, written last

Rows are planned into shards up front (by sample count and by estimated bytes), so a rerun produces the
same shards; a shard whose index carries the same plan digest is skipped. Every file is written under a
temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from webdataset import TarWriter

from lvdflow.errors import UserError
from lvdflow.parts import MapUnits
from lvdflow.stage import file_digest, is_complete, publish, work_dir, write_json_atomic

log = logging.getLogger(__name__)

INDEX = "index.parquet"
ERRORS = "errors.parquet"
STATS = "stats.json"
PLAN_KEY = b"lvdflow.plan_digest"
ERRORS_KEY = b"lvdflow.errors"
# tar overhead per sample: two 512-byte headers, padding of two members, a json of a few hundred bytes.
SAMPLE_OVERHEAD = 2048

# PIL format name -> the extension webdataset decoders know.
FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff",
              "PPM": "ppm", "PGM": "pgm", "PBM": "pbm", "ICO": "ico", "JPEG2000": "jp2", "AVIF": "avif"}

SHARD_INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("id", pa.string()), ("uri", pa.string()), ("ext", pa.string()),
    ("sha256", pa.string()), ("source_sha256", pa.string()), ("bytes", pa.int64()),
    ("cluster", pa.int64()), ("blurred", pa.bool_()), ("offset", pa.int32()),
])
ERROR_SCHEMA = pa.schema([("id", pa.string()), ("uri", pa.string()), ("shard", pa.int32()), ("reason", pa.string()),
                          ("detail", pa.string())])


def shard_name(shard: int) -> str:
    return f"{shard:06d}"


def sample_ext(row: dict[str, Any]) -> str:
    """The image's real extension: from the decoded format, else from its file name."""
    ext = FORMAT_EXT.get(str(row.get("format") or "").upper())
    if ext:
        return ext
    name = row.get("relpath") or row.get("member") or row.get("uri") or ""
    suffix = Path(str(name)).suffix.lower().lstrip(".")
    return {"jpeg": "jpg", "tif": "tiff"}.get(suffix, suffix) or "bin"


def plan_shards(sizes: list[int], max_count: int, max_bytes: int) -> list[tuple[int, int]]:
    """[start, end) row ranges: a new shard starts when the next row would pass either limit."""
    ranges, start, acc = [], 0, 0
    for i, size in enumerate(sizes):
        cost = int(size or 0) + SAMPLE_OVERHEAD
        if i > start and (i - start >= max_count or acc + cost > max_bytes):
            ranges.append((start, i))
            start, acc = i, 0
        acc += cost
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


def _plan_digest(rows: list[dict[str, Any]], blur: bool) -> str:
    h = hashlib.sha256(b"v1" + (b"blur" if blur else b""))
    for r in rows:
        h.update(f"{r['id']}\0{r.get('sha256') or ''}\0{len(r.get('faces') or [])}\n".encode())
    return h.hexdigest()


def read_input_table(path: str | os.PathLike) -> pa.Table:
    """Rows to shard: a retrieve output (retrieved.parquet), an ingest output (manifest.parquet), or a parquet file."""
    p = Path(path)
    if p.is_dir():
        for name in ("retrieved.parquet", "manifest.parquet"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise UserError(f"{path} holds neither retrieved.parquet nor manifest.parquet")
    if not p.is_file():
        raise UserError(f"no such input table: {path}")
    table = pq.read_table(p)
    missing = [c for c in ("id", "source") if c not in table.column_names]
    if missing:
        raise UserError(f"{p} lacks column(s) {missing}: give a retrieve or ingest output")
    return table


def _input_list(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    paths = [str(inputs)] if isinstance(inputs, (str, os.PathLike)) else [str(i) for i in inputs]
    if not paths:
        raise UserError("no input tables given")
    return paths


def read_input_tables(inputs: str | os.PathLike | Sequence[str | os.PathLike],
                      shuffle_seed: int | None = None) -> tuple[pa.Table, int]:
    """The rows of one or several input tables (e.g. one ingest output per curated query set), in order or,
    with `shuffle_seed`, in that seed's permutation; a row whose id an earlier table already holds (the same
    file in two sets) is dropped, and counted."""
    tables = [read_input_table(p) for p in _input_list(inputs)]
    table, repeated = _concat_unique(tables)
    if shuffle_seed is not None:
        table = table.take(np.random.default_rng(shuffle_seed).permutation(table.num_rows))
    return table, repeated


def _concat_unique(tables: list[pa.Table]) -> tuple[pa.Table, int]:
    if len(tables) == 1:
        return tables[0], 0
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise UserError(f"the input tables cannot be sharded together (their columns differ): {exc}") from None
    seen: set[str] = set()
    keep = []
    for i in table["id"].to_pylist():
        keep.append(i not in seen)
        seen.add(i)
    return table.filter(pa.array(keep)), table.num_rows - sum(keep)


def _blur_hook() -> Callable | None:
    try:
        from curation.faces import blur_boxes  # written by the face-blur stage
    except ImportError:
        return None
    return blur_boxes


def blurred_bytes(data: bytes, boxes: list, fmt: str, blur_boxes: Callable) -> tuple[bytes, str]:
    """Decode, blur the face boxes, re-encode in the same format (the one case where bytes change).

    Boxes are `[x, y, w, h]` in the pixels of `curation.decode.decode_rgb(data)` (EXIF orientation applied),
    which is what the face detector saw, so the image is decoded the same way here. Returns (bytes,
    extension); formats PIL cannot write well are stored as PNG.
    """
    from curation.decode import decode_rgb

    out_img = blur_boxes(decode_rgb(data), [[int(round(float(v))) for v in b] for b in boxes])
    buf = io.BytesIO()
    fmt = "JPEG" if fmt == "MPO" else fmt
    save_fmt = fmt if fmt in ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF") else "PNG"
    out_img.save(buf, format=save_fmt, **({"quality": 95} if save_fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue(), FORMAT_EXT[save_fmt]


def _read_bytes(row: dict[str, Any]) -> bytes:
    from curation.decode import read_record_bytes

    return read_record_bytes(row)


@dataclass
class ShardResult:
    shard: int
    samples: int
    bytes: int
    errors: list[dict[str, Any]]
    skipped: bool


def _sample_json(row: dict[str, Any], sha: str, ext: str, blurred: bool) -> dict[str, Any]:
    meta = {
        "id": row["id"], "uri": row.get("uri"), "sha256": sha, "source_sha256": row.get("sha256"), "ext": ext,
        "width": row.get("width"), "height": row.get("height"), "format": row.get("format"),
        "cluster": row.get("cluster"), "blurred": blurred,
    }
    for col in ("queries", "query_sets", "distances"):
        if col in row and row[col] is not None:
            meta[col] = [round(v, 6) if isinstance(v, float) else v for v in row[col]]
    return meta


def write_shard(work: Path, shard: int, rows: list[dict[str, Any]], *, blur: Callable | None, mtime: float) -> ShardResult:
    """Write one shard (tar, then its index) atomically; returns what went in and what could not."""
    name = shard_name(shard)
    tar_path, idx_path = work / f"{name}.tar", work / f"{name}.parquet"
    digest = _plan_digest(rows, blur is not None)
    if tar_path.is_file() and idx_path.is_file():
        meta = pq.read_schema(idx_path).metadata or {}
        if meta.get(PLAN_KEY, b"").decode() == digest:
            errors = json.loads(meta.get(ERRORS_KEY, b"[]"))
            return ShardResult(shard, pq.read_metadata(idx_path).num_rows, tar_path.stat().st_size, errors, skipped=True)
    index_rows, errors = [], []
    tmp = tar_path.with_name(tar_path.name + ".tmp")
    with open(tmp, "wb") as f:
        tw = TarWriter(f, mtime=mtime, encoder=False)  # bytes in, bytes out: nothing is re-encoded
        try:
            for row in rows:
                try:
                    data = _read_bytes(row)
                except Exception as exc:
                    errors.append({"id": row["id"], "uri": row.get("uri"), "shard": shard, "reason": "unreadable", "detail": f"{type(exc).__name__}: {exc}"})
                    continue
                source_sha = hashlib.sha256(data).hexdigest()
                if row.get("sha256") and row["sha256"] != source_sha:
                    errors.append({"id": row["id"], "uri": row.get("uri"), "shard": shard, "reason": "changed_since_ingest",
                                   "detail": f"sha256 {source_sha} != manifest {row['sha256']}"})
                    continue
                faces = row.get("faces") or []
                blurred = False
                if faces:
                    if blur is None:
                        raise UserError("the input has face boxes (column 'faces') but curation.faces.blur_boxes is not "
                                        "available: refusing to write unblurred faces")
                    try:
                        data, blurred_ext = blurred_bytes(data, faces, str(row.get("format") or "PNG").upper(), blur)
                        blurred = True
                    except Exception as exc:
                        errors.append({"id": row["id"], "uri": row.get("uri"), "shard": shard, "reason": "blur_failed", "detail": f"{type(exc).__name__}: {exc}"})
                        continue
                sha = hashlib.sha256(data).hexdigest() if blurred else source_sha
                ext = blurred_ext if blurred else sample_ext(row)
                key = row["id"]
                meta = _sample_json(row, sha, ext, blurred)
                tw.write({"__key__": key, ext: data, "json": json.dumps(meta, sort_keys=True).encode()})
                index_rows.append({"key": key, "id": row["id"], "uri": row.get("uri"), "ext": ext, "sha256": sha,
                                   "source_sha256": source_sha, "bytes": len(data), "cluster": row.get("cluster"),
                                   "blurred": blurred, "offset": len(index_rows)})
        finally:
            tw.close()  # also on a crash: the .tmp is discarded, but the stream must not write to a closed file
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, tar_path)
    table = pa.Table.from_pylist(index_rows, schema=SHARD_INDEX_SCHEMA).replace_schema_metadata(
        {PLAN_KEY: digest.encode(), ERRORS_KEY: json.dumps(errors).encode()}
    )
    itmp = idx_path.with_name(idx_path.name + ".tmp")
    pq.write_table(table, itmp)
    os.replace(itmp, idx_path)  # last: the index marks the shard complete
    return ShardResult(shard, len(index_rows), tar_path.stat().st_size, errors, skipped=False)


def _reuse_published(out: Path, work: Path) -> None:
    """Hard-link the shards of a published output into a new work dir, so a rerun skips unchanged shards."""
    if not is_complete(out) or any(work.glob("*.tar")):
        return
    for p in out.iterdir():
        if p.suffix in (".tar", ".parquet") and p.name not in (INDEX, ERRORS):
            try:
                os.link(p, work / p.name)
            except OSError:
                return


def run_shard(
    retrieved_or_manifest: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    max_count: int = 10_000,
    max_bytes: int = 1 << 30,
    workers: int = 1,
    mtime: float = 0.0,
    shuffle_seed: int | None = 0,
    progress: Callable[[int], None] | None = None,
    map_units: MapUnits | None = None,
) -> dict:
    """Write the rows of a retrieve or ingest output (or of several, concatenated) as WebDataset shards under `out`.

    `max_count` / `max_bytes` bound each shard (bytes are planned from the manifest's `bytes` column, the
    original file sizes, plus a per-sample tar overhead). `mtime` is the time stamp stored in the tars:
    fixed by default so identical inputs give byte-identical shards. Unreadable rows and rows whose bytes
    changed since ingest go to errors.parquet, never into a shard.
    `shuffle_seed` writes the rows in that seed's permutation (None: in input order). Inputs come grouped
    (ingest walks folders in order, retrieval lists images in pool order), and the training reader mixes
    only within a shuffle buffer of its shards: without it, a batch holds a few folders, not the dataset.
    `map_units` (see lvdflow/parts.py) runs the shards elsewhere (one unit per shard); by default they are
    written here, by `workers` threads.
    """
    if max_count < 1 or max_bytes < 1:
        raise UserError("max_count and max_bytes must be positive")
    out = Path(out)
    inputs = _input_list(retrieved_or_manifest)
    table, repeated = read_input_tables(inputs, shuffle_seed)
    has_faces = "faces" in table.column_names and bool(pc.max(pc.list_value_length(table["faces"])).as_py() or 0)
    blur = _blur_hook() if has_faces else None
    if has_faces and blur is None:
        raise UserError("the input has face boxes (column 'faces') but curation.faces.blur_boxes is not available: "
                        "refusing to write unblurred faces")
    sizes = table["bytes"].to_pylist() if "bytes" in table.column_names else [0] * table.num_rows
    plan = plan_shards(sizes, max_count, max_bytes)
    work = work_dir(out)
    _reuse_published(out, work)
    # Shards beyond the plan (an earlier run with smaller limits) would be read as part of the dataset.
    for p in list(work.glob("*.tar")) + list(work.glob("*.parquet")):
        if p.stem.isdigit() and int(p.stem) >= len(plan):
            p.unlink()
    for p in work.glob("*.tmp"):
        p.unlink()  # torn writes of a killed run

    results: list[ShardResult] = []
    if map_units is not None:
        unit = partial(write_planned_shard, inputs, str(work), plan, has_faces, mtime, shuffle_seed)
        results = map_units(unit, list(range(len(plan))))
    else:
        def one(i: int) -> ShardResult:
            s, e = plan[i]
            # Rows as Python dicts one shard at a time: a million-row table would not fit as dicts.
            return write_shard(work, i, table.slice(s, e - s).to_pylist(), blur=blur, mtime=mtime)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for r in pool.map(one, range(len(plan))):
                results.append(r)
                if progress:
                    progress(len(results))
    index = _write_dataset_index(work, len(plan))
    errors = [e for r in results for e in r.errors]
    pq.write_table(pa.Table.from_pylist(errors, schema=ERROR_SCHEMA), work / ERRORS)
    reasons: dict[str, int] = {}
    for e in errors:
        reasons[e["reason"]] = reasons.get(e["reason"], 0) + 1
    stats = {
        "inputs": table.num_rows,
        "repeated_inputs": repeated,  # rows of a later input table whose id an earlier one holds
        "samples": index.num_rows,
        "shards": len(plan),
        "shards_skipped": sum(r.skipped for r in results),
        "tar_bytes": sum(r.bytes for r in results),
        "errors": len(errors),
        "error_reasons": reasons,
        "blurred": int(sum(index["blurred"].to_pylist())) if index.num_rows else 0,
        "per_shard": [r.samples for r in results],
        "max_count": max_count,
        "max_bytes": max_bytes,
    }
    write_json_atomic(work / STATS, stats)  # last of the data files, like img2dataset's _stats.json
    manifest = {
        "stage": "shard",
        "params": {"max_count": max_count, "max_bytes": max_bytes, "mtime": mtime, "shuffle_seed": shuffle_seed},
        "counts": {k: stats[k] for k in ("inputs", "repeated_inputs", "samples", "shards", "shards_skipped",
                                         "errors", "blurred")},
        "error_reasons": reasons,
        "outputs": {"index": INDEX, "errors": ERRORS, "stats": STATS, "pattern": "{shard:06d}.tar"},
        "digest": file_digest(work / INDEX),
    }
    return publish(work, out, manifest)


@lru_cache(maxsize=2)
def _cached_input_table(paths: tuple[str, ...], stamp: tuple, shuffle_seed: int | None) -> pa.Table:
    return read_input_tables(paths, shuffle_seed)[0]


def _stamp(path: str) -> tuple:
    p = Path(path)
    if p.is_dir():
        return tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(p.glob("*.parquet")))
    return (p.stat().st_mtime_ns, p.stat().st_size)


def write_planned_shard(sources: str | list[str], work: str, plan: list[tuple[int, int]], has_faces: bool,
                        mtime: float, shuffle_seed: int | None, shard: int) -> ShardResult:
    """One unit of `run_shard` for another process: reads the input tables (once per process), writes shard
    `shard` of `plan` into `work`."""
    paths = tuple(_input_list(sources))
    table = _cached_input_table(paths, tuple(_stamp(p) for p in paths), shuffle_seed)
    s, e = plan[shard]
    return write_shard(Path(work), shard, table.slice(s, e - s).to_pylist(), blur=_blur_hook() if has_faces else None,
                       mtime=mtime)


def _write_dataset_index(work: Path, n_shards: int) -> pa.Table:
    parts = []
    for i in range(n_shards):
        t = pq.read_table(work / f"{shard_name(i)}.parquet").replace_schema_metadata(None)
        parts.append(t.append_column("shard", pa.array([i] * t.num_rows, pa.int32())))
    table = pa.concat_tables(parts) if parts else SHARD_INDEX_SCHEMA.append(pa.field("shard", pa.int32())).empty_table()
    tmp = work / (INDEX + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, work / INDEX)
    return table
