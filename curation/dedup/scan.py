"""One pass over the images: decode once, hash the pixels, and hand each image to the descriptor.

Decoding and the descriptor's per-image work run in a thread pool (PIL and OpenCV release the GIL), in
chunks, so only one chunk of decoded images is ever in memory. The pixel hash is taken over the decoded
RGB pixels and the size, so the same picture saved as PNG and as lossless WebP, or with different
metadata, is an exact duplicate, while a re-encoded JPEG is left to copy detection.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np

from curation.dedup.descriptors import Descriptor
from curation.dedup.inputs import Record
from lvdflow.parts import MapUnits, windows


@dataclass
class ScanResult:
    pixel_hash: list[str | None]
    width: np.ndarray
    height: np.ndarray
    error: list[str | None]  # reason code for records that could not be used
    detail: list[str] = field(default_factory=list)


def pixel_hash(img) -> str:
    h = hashlib.sha256(f"{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def describe_one(rec: Record, descriptor: Descriptor) -> tuple:
    """Decode one record, hash its pixels and prepare its descriptor input:
    ("ok", pixel hash, width, height, prepared) or ("error", reason, detail)."""
    from curation.decode import DecodeError, decode_rgb

    if rec.reason:
        return "error", rec.reason, rec.detail
    try:
        img = decode_rgb(rec.read_bytes())
    except DecodeError as exc:
        return "error", f"undecodable:{getattr(exc, 'reason', 'error')}", str(exc)
    except OSError as exc:
        return "error", "unreadable", str(exc)
    return "ok", pixel_hash(img), img.width, img.height, descriptor.prepare(img)


_DESCRIPTORS: dict[tuple, Descriptor] = {}


def describe_records(factory: Callable[[], Descriptor], records: list[Record]) -> list[tuple]:
    """One unit of `scan` for another executor: `describe_one` over a chunk of records, with the descriptor
    built by `factory` (a picklable partial of make_descriptor) once per process."""
    key = (getattr(factory, "func", factory), getattr(factory, "args", ()),
           tuple(sorted(getattr(factory, "keywords", {}).items())))
    if key not in _DESCRIPTORS:
        _DESCRIPTORS[key] = factory()
    desc = _DESCRIPTORS[key]
    return [describe_one(rec, desc) for rec in records]


def scan(records: list[Record], descriptor: Descriptor, *, threads: int | None = None, chunk: int = 256,
         progress: Callable[[int, int], None] | None = None, map_units: MapUnits | None = None,
         factory: Callable[[], Descriptor] | None = None, window: int = 8) -> ScanResult:
    """Describe every record in chunks; `add` gets each chunk in order, here.

    With `map_units` (lvdflow/parts.py) the chunks are decoded and prepared elsewhere, `window` chunks at a
    time, by descriptors that `factory` builds there; otherwise by `threads` threads in this process.
    """
    n = len(records)
    res = ScanResult([None] * n, np.zeros(n, np.int64), np.zeros(n, np.int64), [None] * n, [""] * n)
    starts = list(range(0, n, chunk))

    def absorb(start: int, described: list[tuple]) -> None:
        ok_i, ok_items = [], []
        for i, d in enumerate(described, start):
            if d[0] == "ok":
                _, res.pixel_hash[i], res.width[i], res.height[i], item = d
                ok_i.append(i)
                ok_items.append(item)
            else:
                _, res.error[i], res.detail[i] = d
        descriptor.add(ok_i, ok_items)
        if progress:
            progress(min(n, start + chunk), n)

    if map_units is not None:
        if factory is None:
            raise ValueError("scan: map_units needs the descriptor's factory")
        for win in windows(starts, window):
            chunks = [records[s:s + chunk] for s in win]
            for start, described in zip(win, map_units(partial(describe_records, factory), chunks)):
                absorb(start, described)
        return res
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        for start in starts:
            absorb(start, list(pool.map(lambda r: describe_one(r, descriptor), records[start:start + chunk])))
    return res
