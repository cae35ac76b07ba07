"""The deduplicated pool: ingest manifest rows that dedup kept, with dedup's face boxes when it found any.

Embedding and sharding read this manifest, so what dedup removed (copies, evaluation-set copies, NSFW)
never reaches them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.ingest import MANIFEST, read_manifest_table
from lvdflow.errors import UserError
from lvdflow.stage import file_digest, publish, work_dir

DEDUP_TABLE = "dedup.parquet"


def run_select(ingest_dir: str | os.PathLike, dedup_dir: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    manifest = read_manifest_table(ingest_dir)
    dedup_path = Path(dedup_dir) / DEDUP_TABLE
    if not dedup_path.is_file():
        raise UserError(f"no {DEDUP_TABLE} in {dedup_dir}")
    dedup = pq.read_table(dedup_path)
    # dedup reads the manifest in order and writes one row per record in that order: check, then join by row.
    if dedup.num_rows != manifest.num_rows or dedup.column("path").to_pylist() != manifest.column("relpath").to_pylist():
        raise UserError(f"{dedup_path} was not computed from {ingest_dir}: rerun dedup on that manifest")
    keep = dedup.column("keep")
    kept = manifest.filter(keep)
    if "faces" in dedup.column_names:
        kept = kept.append_column("faces", dedup.column("faces").filter(keep))
    out = Path(out)
    work = work_dir(out, fresh=True)
    pq.write_table(kept, work / MANIFEST)
    removed = dedup.filter(pc.invert(keep))
    reasons: dict[str, int] = {}
    for r in removed.column("reason").to_pylist():
        key = (r or "removed").split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    return publish(work, out, {
        "stage": "select",
        "counts": {"images": manifest.num_rows, "kept": kept.num_rows, "removed": removed.num_rows},
        "removed_reasons": dict(sorted(reasons.items())),
        "outputs": {"manifest": MANIFEST},
        "digest": file_digest(work / MANIFEST),
    })


def schema_of(path: str | os.PathLike) -> pa.Schema:
    return pq.read_schema(Path(path) / MANIFEST)
