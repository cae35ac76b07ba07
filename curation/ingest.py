"""Ingest: read every input image once, keep the good ones in a manifest, quarantine the rest with a reason.

Decoding and validation run in worker processes over bounded batches, and rows are streamed into parquet,
so memory stays flat on a million-file folder. Ids are a hash of the source uri, and sources are walked
in sorted order, so a rerun over the same inputs writes the same manifest.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from curation.decode import DEFAULT_MAX_PIXELS, DecodeError, probe
from curation.sources import Item, iter_source
from lvdflow.errors import UserError
from lvdflow.stage import file_digest, publish, work_dir

MANIFEST = "manifest.parquet"
QUARANTINE = "quarantine.parquet"

MANIFEST_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("uri", pa.string()),
    ("source", pa.string()),
    ("member", pa.string()),
    ("relpath", pa.string()),
    ("sha256", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("format", pa.string()),
    ("mode", pa.string()),
    ("frames", pa.int32()),
    ("bytes", pa.int64()),
])
QUARANTINE_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("source", pa.string()),
    ("member", pa.string()),
    ("relpath", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
])

BATCH = 1024  # items in flight at once: bounds memory (tar members carry their bytes)


def record_id(uri: str) -> str:
    return hashlib.sha1(uri.encode()).hexdigest()[:16]


def check_item(item: Item, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 16) -> tuple[str, dict]:
    """Validate one input. Returns ("ok", manifest row) or ("bad", quarantine row). Never raises."""
    base = {"uri": item.uri, "source": item.source, "member": item.member, "relpath": item.relpath}
    if item.reason:
        return "bad", {**base, "reason": item.reason, "detail": item.detail}
    data = item.data
    if data is None:
        try:
            data = Path(item.source).read_bytes()
        except PermissionError as exc:
            return "bad", {**base, "reason": "unreadable", "detail": f"permission denied: {exc}"}
        except IsADirectoryError:
            return "bad", {**base, "reason": "unreadable", "detail": "is a directory"}
        except OSError as exc:
            return "bad", {**base, "reason": "unreadable", "detail": f"{type(exc).__name__}: {exc}"}
    try:
        info = probe(data, max_pixels)
    except DecodeError as exc:
        return "bad", {**base, "reason": exc.reason, "detail": exc.detail}
    except Exception as exc:  # a decoder bug must cost one image, not the whole ingest
        return "bad", {**base, "reason": "corrupt", "detail": f"{type(exc).__name__}: {exc}"}
    if min(info.width, info.height) < min_side:
        return "bad", {**base, "reason": "too-small",
                       "detail": f"{info.width}x{info.height}, shorter side below {min_side}"}
    return "ok", {
        "id": record_id(item.uri), **base, "sha256": hashlib.sha256(data).hexdigest(),
        "width": info.width, "height": info.height, "format": info.format, "mode": info.mode,
        "frames": info.frames, "bytes": len(data),
    }


def _check_star(args: tuple[Item, int, int]) -> tuple[str, dict]:
    return check_item(*args)


class _Pool:
    """Worker processes that survive a decoder crash: the image that killed a worker is quarantined."""

    def __init__(self, n_workers: int):
        self.n = n_workers
        self.ex: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self.ex is None:
            # forkserver: safe when the caller (a Prefect flow) already runs threads, cheaper than spawn.
            self.ex = ProcessPoolExecutor(self.n, mp_context=multiprocessing.get_context("forkserver"))
        return self.ex

    def check(self, args: list[tuple[Item, int, int]]) -> list[tuple[str, dict]]:
        if self.n <= 0:
            return [_check_star(a) for a in args]
        try:
            # Big chunks: per-item IPC costs more than decoding a small image.
            chunk = max(16, len(args) // (self.n * 4))
            return list(self._executor().map(_check_star, args, chunksize=chunk))
        except BrokenProcessPool:
            self._reset()
        # A worker died (a segfault in a decoder, the OOM killer): redo this batch one image at a time
        # so that only the culprit is quarantined.
        results = []
        for a in args:
            try:
                results.append(self._executor().submit(_check_star, a).result())
            except BrokenProcessPool:
                self._reset()
                item = a[0]
                results.append(("bad", {"uri": item.uri, "source": item.source, "member": item.member,
                                        "relpath": item.relpath, "reason": "decoder-crash",
                                        "detail": "the decoding process died on this input"}))
        return results

    def _reset(self) -> None:
        if self.ex is not None:
            self.ex.shutdown(wait=False, cancel_futures=True)
        self.ex = None

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown(cancel_futures=True)
        self.ex = None


def _batches(it: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(it)
    while batch := list(itertools.islice(it, n)):
        yield batch


class _ParquetSink:
    """Streams rows into a parquet file in row groups; writes an empty file with the schema if no rows."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema, self.rows, self.count = path, schema, [], 0
        self.writer = pq.ParquetWriter(path, schema)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= 8192:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.count += len(self.rows)
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


def run_ingest(
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 16,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Ingest `sources` into `out`/manifest.parquet and `out`/quarantine.parquet; returns the stage manifest.

    `workers=0` validates in this process (for debugging); default: one process per CPU.
    """
    if not sources:
        raise UserError("no sources given")
    paths = [Path(s) for s in sources]
    for p in paths:
        if not p.exists():
            raise UserError(f"source does not exist: {p}")
    out = Path(out)
    work = work_dir(out, fresh=True)
    stats: dict[str, int] = {}
    items = itertools.chain.from_iterable(iter_source(p, stats) for p in paths)

    good = _ParquetSink(work / MANIFEST, MANIFEST_SCHEMA)
    bad = _ParquetSink(work / QUARANTINE, QUARANTINE_SCHEMA)
    reasons: dict[str, int] = {}
    seen_ids: set[str] = set()
    n_workers = (os.cpu_count() or 1) if workers is None else workers
    pool = _Pool(n_workers)
    done = 0
    try:
        for batch in _batches(items, BATCH):
            for status, row in pool.check([(item, max_pixels, min_side) for item in batch]):
                if status == "ok" and row["id"] in seen_ids:  # the same uri reached through two sources
                    status, row = "bad", {k: row[k] for k in ("uri", "source", "member", "relpath")}
                    row.update(reason="duplicate-entry", detail="the same file was given twice")
                if status == "ok":
                    seen_ids.add(row["id"])
                    good.add(row)
                else:
                    reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
                    bad.add(row)
            done += len(batch)
            if progress:
                progress(done)
    finally:
        pool.close()
        good.close()
        bad.close()

    manifest = {
        "stage": "ingest",
        "sources": [str(p.resolve()) for p in paths],
        "params": {"max_pixels": max_pixels, "min_side": min_side},
        "counts": {"inputs": done, "images": good.count, "quarantined": bad.count, **stats},
        "quarantine_reasons": dict(sorted(reasons.items())),
        "outputs": {"manifest": MANIFEST, "quarantine": QUARANTINE},
        "digest": file_digest(work / MANIFEST),
    }
    return publish(work, out, manifest)


def read_manifest_table(path: str | os.PathLike) -> pa.Table:
    """The manifest table of an ingest output directory (or a manifest.parquet path)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST
    if not p.is_file():
        raise UserError(f"no ingest manifest at {path} (expected a directory holding {MANIFEST})")
    return pq.read_table(p)


def item_fields() -> list[str]:
    return list(asdict(Item("", "", None, "")).keys())
