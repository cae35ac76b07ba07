"""The dedup stage: exact duplicates, copy detection, decontamination, optional pool hygiene.

run_dedup(INPUT, out, ...) writes out/dedup.parquet (one row per pool image: path, component, keep,
reason, matched, score, ...), out/report.md with PNG grids of the largest groups, and stage.json.
LVD-142M's recipe: a copy descriptor for every image, k = 64 nearest neighbours by faiss, edges above
0.6, connected components, one image kept per component; then against the evaluation sets with the
stricter 0.45, dropping every component that touches one of their images.
"""

from __future__ import annotations

import logging
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.dedup.descriptors import make_descriptor
from curation.dedup.inputs import Record, load_input
from curation.dedup.knn import build_index, knn_pairs
from curation.dedup.scan import scan
from curation.dedup.selection import decide
from lvdflow.errors import UserError
from lvdflow.parts import MapUnits
from lvdflow.stage import file_digest, publish, work_dir

log = logging.getLogger(__name__)

STAGE = "dedup"
OUTPUT = "dedup.parquet"
PAIRS = "pairs.parquet"  # every scored candidate pair: for choosing a threshold without rerunning
DEFAULT_THRESHOLD = 0.6  # LVD-142M self-dedup
DEFAULT_REFERENCE_THRESHOLD = 0.45  # LVD-142M relative dedup against evaluation sets (stricter removal)


def run_dedup(input: str | Path, out: str | Path, *, references: Sequence[str | Path] = (),
              descriptor: str = "builtin", weights: str | Path | None = None,
              threshold: float = DEFAULT_THRESHOLD, reference_threshold: float = DEFAULT_REFERENCE_THRESHOLD,
              k: int = 64, index: str = "auto", nsfw: bool = False, nsfw_threshold: float = 0.6,
              faces: bool = False, face_min_size: int = 24, device: str | None = None,
              batch_size: int = 64, threads: int | None = None, chunk: int = 256,
              map_units: MapUnits | None = None) -> dict[str, Any]:
    """Dedup `input` into `out` (see docs/dedup.md). `map_units` (lvdflow/parts.py) decodes and prepares
    the descriptors' inputs elsewhere, chunk by chunk; the result is the same as in this process."""
    t0 = time.time()
    if not 0.0 < threshold <= 1.0 or not 0.0 < reference_threshold <= 1.0:
        raise UserError("thresholds must lie in (0, 1]")
    if k < 1:
        raise UserError("k must be at least 1")
    root, records = load_input(input)
    ref_sets = [load_input(r) for r in references]
    refs: list[Record] = [rec for _, recs in ref_sets for rec in recs]
    ref_names = [str(Path(rroot) / rec.path) for rroot, recs in ref_sets for rec in recs]
    # A factory, not just an instance: with `map_units` each worker builds its own descriptor.
    factory = partial(make_descriptor, descriptor, weights, device=device, batch_size=batch_size, threads=threads)
    desc = factory()
    out = Path(out)
    work = work_dir(out, fresh=True)  # descriptors are cheap to redo next to a half-written parquet

    n, r = len(records), len(refs)
    allrecs = records + refs  # one descriptor space: the built-in codebook is fitted on both
    desc.begin(n + r, work)
    scanned = scan(allrecs, desc, threads=threads, chunk=chunk, map_units=map_units, factory=factory,
                   progress=lambda d, t: log.info("dedup: described %d/%d images", d, t))
    vecs = desc.finish()
    t_desc = time.time()

    usable = np.array([h is not None for h in scanned.pixel_hash])
    pool_ids = np.flatnonzero(usable[:n])
    ref_ids = n + np.flatnonzero(usable[n:])
    # Candidate pairs: the built-in descriptor verifies only its best few neighbours per image (the
    # geometric check costs milliseconds per pair); learned descriptors take all k.
    k_eff = min(k, getattr(desc, "max_candidates", k))
    edges_i = edges_j = np.zeros(0, np.int64)
    edges_s = np.zeros(0, np.float32)
    index_info: dict = {}
    if len(pool_ids) > 1:
        idx, index_info = build_index(vecs[pool_ids], kind=index)
        qi, qj, qs = knn_pairs(idx, vecs[pool_ids], k_eff, min_score=desc.candidate_floor, exclude_self=True)
        qi, qj = pool_ids[qi], pool_ids[qj]
        sc = desc.pair_scores(qi, qj, qs)
        _write_pairs(work / PAIRS, records, qi, qj, qs, sc)
        keep = sc >= threshold
        edges_i, edges_j, edges_s = qi[keep], qj[keep], sc[keep]
        del idx
    ref_hits = None
    if len(ref_ids) and len(pool_ids):
        ridx, _ = build_index(vecs[ref_ids], kind=index)
        hi, hj, hs = knn_pairs(ridx, vecs[pool_ids], min(k_eff, len(ref_ids)), min_score=desc.candidate_floor,
                               exclude_self=False)
        hi, hj = pool_ids[hi], ref_ids[hj]
        sc = desc.pair_scores(hi, hj, hs)
        keep = sc >= reference_threshold
        ref_hits = (hi[keep], hj[keep] - n, sc[keep])
    t_knn = time.time()

    area = scanned.width[:n] * scanned.height[:n]
    dec = decide(scanned.pixel_hash[:n], area, scanned.error[:n], (edges_i, edges_j, edges_s), ref_hits)

    rows = []
    for i, rec in enumerate(records):
        m = dec.matched[i]
        if m is None:
            matched = None
        elif dec.reason[i] == "reference-copy":
            matched = ref_names[m]
        else:
            matched = records[m].path
        rows.append({
            "path": rec.path, "component": int(dec.component[i]), "keep": bool(dec.keep[i]),
            "reason": dec.reason[i], "matched": matched,
            "score": None if np.isnan(dec.score[i]) else float(dec.score[i]),
            "group_size": int(dec.group_size[i]), "width": int(scanned.width[i]),
            "height": int(scanned.height[i]), "pixel_sha256": scanned.pixel_hash[i],
            "detail": scanned.detail[i] or None,
        })

    hygiene: dict[str, Any] = {}
    if nsfw or faces:
        from curation.hygiene import apply_hygiene

        hygiene = apply_hygiene(records, rows, nsfw=nsfw, nsfw_threshold=nsfw_threshold, faces=faces,
                                face_min_size=face_min_size, threads=threads)

    shutil.rmtree(work / "builtin_features", ignore_errors=True)  # scratch; can be tens of GB
    table = pa.Table.from_pylist(rows, schema=_schema(nsfw, faces))
    pq.write_table(table, work / OUTPUT)

    from curation.dedup.report import write_report

    by_path = {rec.path: rec for rec in records}
    by_ref = dict(zip(ref_names, refs))
    params = {"descriptor": descriptor, "threshold": threshold, "reference_threshold": reference_threshold,
              "k": k, "candidates_per_image": k_eff}
    rep = write_report(work, rows, params, lambda p: _load(by_path.get(p)), lambda p: _load(by_ref.get(p)))

    counts: dict[str, int] = {}
    for row in rows:
        key = row["reason"] or "kept"
        key = key.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    manifest = {
        "stage": STAGE,
        "input": str(root),
        "references": [str(Path(p).resolve()) for p in references],
        "params": {**params, **desc.params(), "index": index, "nsfw": nsfw, "nsfw_threshold": nsfw_threshold,
                   "faces": faces, "face_min_size": face_min_size},
        "index": index_info,
        "counts": {
            "images": n, "reference_images": r,
            "kept": int(sum(1 for row in rows if row["keep"])),
            "removed": int(sum(1 for row in rows if not row["keep"])),
            "copy_edges": int(len(edges_i)),
            "reference_hits": int(len(ref_hits[0])) if ref_hits else 0,
            **{f"reason: {k}": v for k, v in sorted(counts.items())},
        },
        **hygiene,
        **rep,
        "seconds": {"describe": round(t_desc - t0, 2), "knn_verify": round(t_knn - t_desc, 2),
                    "total": round(time.time() - t0, 2)},
        "digest": file_digest(work / OUTPUT),
    }
    return publish(work, out, manifest)


def _write_pairs(path: Path, records: list[Record], i: np.ndarray, j: np.ndarray, cos: np.ndarray,
                 score: np.ndarray) -> None:
    pq.write_table(pa.table({
        "a": pa.array([records[x].path for x in i.tolist()], pa.string()),
        "b": pa.array([records[x].path for x in j.tolist()], pa.string()),
        "cosine": pa.array(cos, pa.float32()),
        "score": pa.array(score, pa.float32()),
    }), path)


def _load(rec: Record | None):
    if rec is None:
        return None
    from curation.decode import decode_rgb

    return decode_rgb(rec.read_bytes())


def _schema(nsfw: bool, faces: bool) -> pa.Schema:
    fields = [
        ("path", pa.string()), ("component", pa.int64()), ("keep", pa.bool_()), ("reason", pa.string()),
        ("matched", pa.string()), ("score", pa.float32()), ("group_size", pa.int64()), ("width", pa.int64()),
        ("height", pa.int64()), ("pixel_sha256", pa.string()), ("detail", pa.string()),
    ]
    if nsfw:
        fields.append(("nsfw_score", pa.float32()))
    if faces:
        # [x, y, w, h] boxes in the decoded image's pixels; the shard writer blurs them
        fields.append(("faces", pa.list_(pa.list_(pa.int32(), 4))))
    return pa.schema(fields)

