"""What the dedup stage reads: a folder of images, or an ingest output (a folder with manifest.parquet).

Both become the same list of records in a deterministic order (the manifest's order, or sorted paths),
which is the "first seen" order of the keep rule. Files a folder walk rejects before decoding (links
leaving the folder, broken links) come back as skipped rows with their reason, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from lvdflow.errors import UserError

MANIFEST = "manifest.parquet"


@dataclass
class Record:
    path: str  # relative to the input folder (ingest's relpath)
    source: str  # absolute file path, or the tar holding the image
    member: str | None = None  # tar member name
    reason: str | None = None  # set when the record was rejected before decoding
    detail: str = ""

    def read_bytes(self) -> bytes:
        from curation.decode import read_record_bytes

        return read_record_bytes({"source": self.source, "member": self.member})


def _from_manifest(path: Path) -> list[Record]:
    table = pq.read_table(path)
    cols = set(table.column_names)
    if not {"source", "relpath"} <= cols:
        raise UserError(f"{path} is not an ingest manifest: it lacks the columns 'source' and 'relpath'")
    src = table.column("source").to_pylist()
    rel = table.column("relpath").to_pylist()
    mem = table.column("member").to_pylist() if "member" in cols else [None] * len(src)
    return [Record(r, s, m) for s, r, m in zip(src, rel, mem)]


def _from_folder(root: Path) -> list[Record]:
    from curation.sources import IMAGE_EXTENSIONS, iter_folder

    stats: dict[str, int] = {}
    out = []
    for item in iter_folder(root, stats):
        if item.reason is None and Path(item.relpath).suffix.lower() not in IMAGE_EXTENSIONS:
            continue  # READMEs, sidecar JSON: not images, not part of the pool
        out.append(Record(item.relpath, item.source, item.member, item.reason, item.detail))
    return out


def load_input(path: str | Path) -> tuple[Path, list[Record]]:
    """(root, records) for a folder of images, an ingest output folder, or a manifest.parquet file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"input does not exist: {path}")
    if p.is_file():
        if p.suffix != ".parquet":
            raise UserError(f"input must be a folder of images, an ingest output folder or its {MANIFEST}: {path}")
        return p.parent.resolve(), _from_manifest(p)
    if (p / MANIFEST).is_file():
        return p.resolve(), _from_manifest(p / MANIFEST)
    records = _from_folder(p)
    if not records:
        raise UserError(f"no images found in {path} (and no {MANIFEST}: is this the right folder?)")
    return p.resolve(), records
