"""Stage outputs on disk: atomic publication, completion markers and small manifests.

Every stage is a function from inputs on disk to an output directory plus a small JSON manifest
(`stage.json`). Outputs are built in a sibling work directory (`<out>.partial`) and renamed into place
only when complete, with a `_SUCCESS` marker written last, so a crashed stage never leaves a directory
that looks finished. The work directory keeps its name across runs, so resumable stages can continue
from what a killed run left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

SUCCESS = "_SUCCESS"
MANIFEST = "stage.json"


def work_dir_of(out: Path) -> Path:
    """Where `work_dir(out)` builds the output (without creating it)."""
    return Path(str(Path(out)) + ".partial")


def work_dir(out: Path, *, fresh: bool = False) -> Path:
    """The in-progress directory for `out`. `fresh=True` discards what an earlier run left."""
    work = work_dir_of(out)
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    return work


def is_complete(out: Path) -> bool:
    """True when `out` was published by `publish` and not damaged since (marker and manifest present)."""
    out = Path(out)
    return (out / SUCCESS).is_file() and (out / MANIFEST).is_file()


def read_manifest(out: Path) -> dict[str, Any]:
    return json.loads((Path(out) / MANIFEST).read_text())


def publish(work: Path, out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest and marker into `work`, then move it to `out` (replacing an older `out`).

    Returns the manifest, with `dir` set to the final location. The rename is atomic on one
    filesystem; the old output is moved aside first so that a crash in between leaves either the old
    or the new directory, never a half-written one under the final name.
    """
    work, out = Path(work), Path(out)
    manifest = dict(manifest)
    manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    manifest["dir"] = str(out.resolve())
    _write_json_atomic(work / MANIFEST, manifest)
    (work / SUCCESS).write_text("ok\n")
    old = None
    if out.exists():
        old = Path(str(out) + ".old")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    work.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return manifest


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never a torn one."""
    _write_json_atomic(Path(path), obj)


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_digest(path: Path, *, skip: Iterable[str] = (SUCCESS, MANIFEST)) -> str:
    """Content digest of a directory: relative names and bytes of every file, in sorted order.

    Stage manifests and markers are skipped, since they carry timestamps and absolute paths.
    """
    root = Path(path)
    skip = set(skip)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in skip:
            h.update(str(p.relative_to(root)).encode())
            h.update(b"\0")
            h.update(file_digest(p).encode())
    return h.hexdigest()


# Files above this size are fingerprinted by (size, mtime) instead of hashed: a multi-GB tar shard is
# re-read only when it changes on disk.
_HASH_LIMIT = 64 << 20


def fingerprint(path: str | os.PathLike) -> str:
    """Content fingerprint of an input path: a published stage's digest, a small file's hash (a large file's
    size and mtime), or a folder's listing with sizes and mtimes. Used by the flows' cache keys and by
    stages that reuse an earlier stage's work on the same input (dedup's candidates)."""
    p = Path(path)
    if p.is_dir() and is_complete(p):
        m = read_manifest(p)
        if "digest" in m:
            return "stage:" + m["digest"]
    h = hashlib.sha256()
    if p.is_file():
        st = p.stat()
        if st.st_size <= _HASH_LIMIT:
            h.update(p.read_bytes())
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        return "file:" + h.hexdigest()
    if p.is_dir():
        # A listing, not the bytes: a raw image folder can hold millions of files.
        for root, dirs, files in os.walk(p):
            dirs.sort()
            for name in sorted(files):
                fp = Path(root) / name
                try:
                    st = fp.lstat()
                except OSError:
                    continue
                h.update(f"{fp.relative_to(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return "dir:" + h.hexdigest()
    return "missing:" + str(p)
