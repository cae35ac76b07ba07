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
from typing import Any, Callable

import numpy as np

from curation.dedup.descriptors import Descriptor
from curation.dedup.inputs import Record


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


def scan(records: list[Record], descriptor: Descriptor, *, threads: int | None = None, chunk: int = 256,
         progress: Callable[[int, int], None] | None = None) -> ScanResult:
    from curation.decode import DecodeError, decode_rgb

    n = len(records)
    res = ScanResult([None] * n, np.zeros(n, np.int64), np.zeros(n, np.int64), [None] * n, [""] * n)

    def work(i: int) -> tuple[int, Any]:
        rec = records[i]
        if rec.reason:
            return i, (rec.reason, rec.detail)
        try:
            img = decode_rgb(rec.read_bytes())
        except DecodeError as exc:
            return i, (f"undecodable:{getattr(exc, 'reason', 'error')}", str(exc))
        except OSError as exc:
            return i, ("unreadable", str(exc))
        res.pixel_hash[i] = pixel_hash(img)
        res.width[i], res.height[i] = img.size
        return i, descriptor.prepare(img)

    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        for start in range(0, n, chunk):
            done = list(pool.map(work, range(start, min(n, start + chunk))))
            ok_i, ok_items = [], []
            for i, item in done:
                if res.pixel_hash[i] is None:
                    res.error[i], res.detail[i] = item
                else:
                    ok_i.append(i)
                    ok_items.append(item)
            descriptor.add(ok_i, ok_items)
            if progress:
                progress(min(n, start + chunk), n)
    return res
