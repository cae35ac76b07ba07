"""Ingest: read every input image once, keep the good ones in a manifest, quarantine the rest with a reason.

Decoding and validation run in worker processes over bounded batches, and rows are streamed into parquet,
so memory stays flat on a million-file folder. Ids are a hash of the source uri, and sources are walked
in sorted order, so a rerun over the same inputs writes the same manifest.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from curation.decode import DEFAULT_MAX_PIXELS, DecodeError, probe
from curation.sources import Item, iter_source
from lvdflow.errors import UserError
from lvdflow.io_retry import retry_io
from lvdflow.parts import MapUnits
from lvdflow.stage import file_digest, publish, work_dir, write_json_atomic

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
            data = retry_io(Path(item.source).read_bytes, what=f"reading {item.source}")
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


def check_batch(max_pixels: int, min_side: int, batch: list[Item]) -> list[tuple[str, dict]]:
    """One unit of `run_ingest` for another executor: checks a batch in this process."""
    return [check_item(item, max_pixels, min_side) for item in batch]


def _check_star(args: tuple[Item, int, int]) -> tuple[str, dict]:
    return check_item(*args)


class _Pool:
    """Worker processes that survive a decoder crash: the image that killed a worker is quarantined."""

    def __init__(self, n_workers: int):
        self.n = n_workers
        self.ex: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self.ex is None:
            # forkserver: safe when the caller (a Prefect flow) already runs threads. On Python 3.11 it is
            # no cheaper than spawn: its preload of __main__ reads a key the parent never sends, so each
            # worker imports the parent's main module itself (~8 s when that is a flow run's, which imports
            # Prefect; a pool's first batch waits for it, later batches do not).
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


def _write_parquet_atomic(rows: list[dict], schema: pa.Schema, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    os.replace(tmp, path)


def _concat_parts(parts: list[Path], schema: pa.Schema, dest: Path) -> int:
    """Stream the per-batch parts into one parquet file (one row group per part); returns the row count."""
    n = 0
    with pq.ParquetWriter(dest, schema) as writer:
        for part in parts:
            table = pq.read_table(part, schema=schema)
            if table.num_rows:
                writer.write_table(table)
                n += table.num_rows
    return n


def run_ingest(
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 16,
    batch_size: int = BATCH,
    progress: Callable[[int], None] | None = None,
    map_units: MapUnits | None = None,
    window: int = 16,
) -> dict[str, Any]:
    """Ingest `sources` into `out`/manifest.parquet and `out`/quarantine.parquet; returns the stage manifest.

    `workers=0` validates in this process (for debugging); default: one process per CPU.
    Resumable: each batch of inputs is written as a part file in `<out>.partial/parts/`, and a rerun of the
    same job after a crash (kill -9 included) skips the batches already written. The inputs are enumerated
    in a fixed order, so batch i is the same set of inputs in every run.
    `map_units` (lvdflow/parts.py) checks the batches elsewhere, `window` batches at a time (tar members
    travel with their bytes, so the window bounds memory); ids, duplicates and part files are handled
    here, in batch order, so the manifest is the same whichever executor checked the images.
    """
    if not sources:
        raise UserError("no sources given")
    paths = [Path(s) for s in sources]
    for p in paths:
        if not p.exists():
            raise UserError(f"source does not exist: {p}")
    out = Path(out)
    job = {"sources": [str(p.resolve()) for p in paths], "max_pixels": max_pixels, "min_side": min_side,
           "batch": batch_size}
    work = work_dir(out)
    if _read_json(work / "job.json") != job:  # another job's leftovers: start afresh
        work = work_dir(out, fresh=True)
        write_json_atomic(work / "job.json", job)
    parts = work / "parts"
    parts.mkdir(exist_ok=True)

    stats: dict[str, int] = {}
    items = itertools.chain.from_iterable(iter_source(p, stats) for p in paths)
    reasons: dict[str, int] = {}
    seen_ids: set[str] = set()
    good_parts, bad_parts = [], []
    pool = _Pool((os.cpu_count() or 1) if workers is None else workers) if map_units is None else None
    done = resumed = 0

    def check_window(batches: list[list[Item]]) -> list[list[tuple[str, dict]]]:
        if pool is not None:
            return [pool.check([(item, max_pixels, min_side) for item in b]) for b in batches]
        return map_units(partial(check_batch, max_pixels, min_side), batches)

    def record(i: int, checked: list[tuple[str, dict]]) -> None:
        # In batch order, here in this process: the duplicate check needs every earlier batch's ids.
        good, bad = [], []
        for status, row in checked:
            if status == "ok" and row["id"] in seen_ids:  # the same uri reached through two sources
                status, row = "bad", {k: row[k] for k in ("uri", "source", "member", "relpath")}
                row.update(reason="duplicate-entry", detail="the same file was given twice")
            if status == "ok":
                seen_ids.add(row["id"])
                good.append(row)
            else:
                reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
                bad.append(row)
        _write_parquet_atomic(bad, QUARANTINE_SCHEMA, bad_parts[i])
        _write_parquet_atomic(good, MANIFEST_SCHEMA, good_parts[i])  # last: marks the batch complete

    pending: list[tuple[int, list[Item]]] = []  # batches to check, at most `window` in flight

    def flush() -> None:
        nonlocal done
        for (i, batch), checked in zip(pending, check_window([b for _, b in pending])):
            record(i, checked)
            done += len(batch)
            if progress:
                progress(done)
        pending.clear()

    try:
        for i, batch in enumerate(_batches(items, batch_size)):
            good_part, bad_part = parts / f"manifest-{i:06d}.parquet", parts / f"quarantine-{i:06d}.parquet"
            good_parts.append(good_part)
            bad_parts.append(bad_part)
            if good_part.is_file() and bad_part.is_file():  # written by an earlier, interrupted run
                flush()
                seen_ids.update(pq.read_table(good_part, columns=["id"]).column("id").to_pylist())
                for r in pq.read_table(bad_part, columns=["reason"]).column("reason").to_pylist():
                    reasons[r] = reasons.get(r, 0) + 1
                resumed += len(batch)
                done += len(batch)
            else:
                pending.append((i, batch))
                if len(pending) >= (1 if pool is not None else window):
                    flush()
        flush()
    finally:
        if pool is not None:
            pool.close()

    n_good = _concat_parts(good_parts, MANIFEST_SCHEMA, work / MANIFEST)
    n_bad = _concat_parts(bad_parts, QUARANTINE_SCHEMA, work / QUARANTINE)
    shutil.rmtree(parts)
    (work / "job.json").unlink()
    manifest = {
        "stage": "ingest",
        "sources": job["sources"],
        "params": {"max_pixels": max_pixels, "min_side": min_side},
        "counts": {"inputs": done, "images": n_good, "quarantined": n_bad, **stats},
        "quarantine_reasons": dict(sorted(reasons.items())),
        "resumed_inputs": resumed,
        "outputs": {"manifest": MANIFEST, "quarantine": QUARANTINE},
        "digest": file_digest(work / MANIFEST),
    }
    return publish(work, out, manifest)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_manifest_table(path: str | os.PathLike) -> pa.Table:
    """The manifest table of an ingest output directory (or a manifest.parquet path)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST
    if not p.is_file():
        raise UserError(f"no ingest manifest at {path} (expected a directory holding {MANIFEST})")
    return pq.read_table(p)
