"""The dedup stage: exact duplicates, copy detection, decontamination, optional pool hygiene.

Two halves, each a stage of its own so that another threshold does not describe the images again:
find_candidates(INPUT, cand) describes every image, searches its faiss neighbours and scores every
candidate pair (images.parquet, pairs.parquet, reference_pairs.parquet); decide_dedup(cand, out) cuts the
pairs at the thresholds and writes out/dedup.parquet (one row per pool image: path, component, keep,
reason, matched, score, ...), out/report.md with PNG grids of the largest groups, and stage.json.
run_dedup(INPUT, out) runs both. LVD-142M's recipe: a copy descriptor for every image, k = 64 nearest
neighbours by faiss, edges above 0.6, connected components, one image kept per component; then against
the evaluation sets with the stricter 0.45, dropping every component that touches one of their images.
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
from lvdflow.stage import dir_digest, file_digest, fingerprint, is_complete, publish, read_manifest, work_dir

log = logging.getLogger(__name__)

STAGE = "dedup"
CANDIDATES_STAGE = "dedup-candidates"
OUTPUT = "dedup.parquet"
# The candidates stage's tables: everything the decision needs, so that another threshold reruns only it.
IMAGES = "images.parquet"  # one row per pool image, then per reference image: hash, size, decode error
PAIRS = "pairs.parquet"  # every scored candidate pool pair: also for choosing a threshold by hand
REFERENCE_PAIRS = "reference_pairs.parquet"  # every scored (pool image, reference image) candidate
DEFAULT_THRESHOLD = 0.6  # LVD-142M self-dedup
DEFAULT_REFERENCE_THRESHOLD = 0.45  # LVD-142M relative dedup against evaluation sets (stricter removal)
# Thresholds the report also counts (edges, images kept), from the same candidates: a cheap look before
# rerunning the decision at another one.
SWEEP_THRESHOLDS = (0.45, 0.5, 0.6, 0.7, 0.8, 0.9)
# The run_dedup keywords that only the decision reads; the rest choose the candidates.
DECISION_PARAMS = ("threshold", "reference_threshold", "nsfw", "nsfw_threshold", "faces", "face_min_size")


def candidates_dir_for(out: str | Path) -> Path:
    """Where run_dedup keeps the candidates of `out` unless told: beside it, `<out>-candidates`."""
    return Path(str(Path(out)) + "-candidates")


def split_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """run_dedup's keywords as (find_candidates', decide_dedup's); `threads` goes to both."""
    decision = {k: v for k, v in params.items() if k in DECISION_PARAMS or k == "threads"}
    return {k: v for k, v in params.items() if k not in DECISION_PARAMS}, decision


def run_dedup(input: str | Path, out: str | Path, *, candidates: str | Path | None = None,
              references: Sequence[str | Path] = (), threshold: float = DEFAULT_THRESHOLD,
              reference_threshold: float = DEFAULT_REFERENCE_THRESHOLD, nsfw: bool = False,
              nsfw_threshold: float = 0.6, faces: bool = False, face_min_size: int = 24,
              threads: int | None = None, **candidate_params: Any) -> dict[str, Any]:
    """Dedup `input` into `out` (see docs/dedup.md): find_candidates into `candidates` (default
    `<out>-candidates`), then decide_dedup. `candidate_params` are find_candidates' keywords."""
    _check_thresholds(threshold, reference_threshold)  # before the costly half, not after it
    cand = find_candidates(input, candidates or candidates_dir_for(out), references=references, threads=threads,
                           **candidate_params)
    return decide_dedup(cand["dir"], out, threshold=threshold, reference_threshold=reference_threshold,
                        nsfw=nsfw, nsfw_threshold=nsfw_threshold, faces=faces, face_min_size=face_min_size,
                        threads=threads)


def find_candidates(input: str | Path, out: str | Path, *, references: Sequence[str | Path] = (),
                    descriptor: str = "builtin", weights: str | Path | None = None, k: int = 64,
                    index: str = "auto", device: str | None = None, batch_size: int = 64,
                    threads: int | None = None, chunk: int = 256,
                    map_units: MapUnits | None = None) -> dict[str, Any]:
    """The expensive half of dedup, independent of the thresholds: a descriptor per image, faiss kNN, every
    candidate pair scored (pool against pool, pool against references). `map_units` (lvdflow/parts.py)
    decodes and prepares the descriptors' inputs elsewhere, chunk by chunk; the result is the same."""
    t0 = time.time()
    if k < 1:
        raise UserError("k must be at least 1")
    root, records = load_input(input)
    ref_sets = [load_input(r) for r in references]
    refs: list[Record] = [rec for _, recs in ref_sets for rec in recs]
    ref_names = [str(Path(rroot) / rec.path) for rroot, recs in ref_sets for rec in recs]
    # Taken before the images are read, so that a change made while they are described is seen too.
    fingerprints = _fingerprints(root, references)
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
    none = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32)
    pool_pairs = ref_pairs = none
    index_info: dict = {}
    if len(pool_ids) > 1:
        idx, index_info = build_index(vecs[pool_ids], kind=index)
        qi, qj, qs = knn_pairs(idx, vecs[pool_ids], k_eff, min_score=desc.candidate_floor, exclude_self=True)
        qi, qj = pool_ids[qi], pool_ids[qj]
        pool_pairs = (qi, qj, qs, desc.pair_scores(qi, qj, qs))
        del idx
    if len(ref_ids) and len(pool_ids):
        ridx, _ = build_index(vecs[ref_ids], kind=index)
        hi, hj, hs = knn_pairs(ridx, vecs[pool_ids], min(k_eff, len(ref_ids)), min_score=desc.candidate_floor,
                               exclude_self=False)
        hi, hj = pool_ids[hi], ref_ids[hj]
        ref_pairs = (hi, hj - n, hs, desc.pair_scores(hi, hj, hs))
    t_knn = time.time()

    shutil.rmtree(work / "builtin_features", ignore_errors=True)  # scratch; can be tens of GB
    names = [rec.path for rec in records]
    pq.write_table(pa.table({
        "name": pa.array(names + ref_names, pa.string()),
        "reference": pa.array([False] * n + [True] * r, pa.bool_()),
        "width": pa.array(scanned.width, pa.int64()), "height": pa.array(scanned.height, pa.int64()),
        "pixel_sha256": pa.array(scanned.pixel_hash, pa.string()),
        "error": pa.array(scanned.error, pa.string()),
        "detail": pa.array([d or None for d in scanned.detail], pa.string()),
    }), work / IMAGES)
    _write_pairs(work / PAIRS, names, names, *pool_pairs)
    _write_pairs(work / REFERENCE_PAIRS, names, ref_names, *ref_pairs)
    manifest = {
        "stage": CANDIDATES_STAGE,
        "input": str(root),
        "references": [str(Path(p).resolve()) for p in references],
        "input_fingerprints": fingerprints,
        "params": {"descriptor": descriptor, "k": k, "candidates_per_image": k_eff, "index": index,
                   **desc.params()},
        "index": index_info,
        "counts": {"images": n, "reference_images": r, "candidate_pairs": int(len(pool_pairs[0])),
                   "reference_candidate_pairs": int(len(ref_pairs[0]))},
        "seconds": {"describe": round(t_desc - t0, 2), "knn_verify": round(t_knn - t_desc, 2),
                    "total": round(time.time() - t0, 2)},
        "digest": dir_digest(work),
    }
    return publish(work, out, manifest)


def decide_dedup(candidates: str | Path, out: str | Path, *, threshold: float = DEFAULT_THRESHOLD,
                 reference_threshold: float = DEFAULT_REFERENCE_THRESHOLD, nsfw: bool = False,
                 nsfw_threshold: float = 0.6, faces: bool = False, face_min_size: int = 24,
                 threads: int | None = None) -> dict[str, Any]:
    """The cheap half of dedup: edges at `threshold`, connected components, one image kept per component,
    components copying a reference dropped, then the optional NSFW and face passes, the report and
    dedup.parquet. Reads a find_candidates output; the images themselves only for hygiene and the report."""
    t0 = time.time()
    _check_thresholds(threshold, reference_threshold)
    candidates = Path(candidates)
    cm = read_manifest(candidates) if is_complete(candidates) else {}
    if cm.get("stage") != CANDIDATES_STAGE:
        raise UserError(f"not a complete {CANDIDATES_STAGE} output: {candidates}")
    if "input_fingerprints" not in cm:
        raise UserError(f"{candidates} records no fingerprint of its input (an older version): rerun its "
                        f"candidates stage")
    changed = [p for p, was, now in zip([cm["input"], *cm["references"]], cm["input_fingerprints"],
                                        _fingerprints(cm["input"], cm["references"])) if was != now]
    if changed:
        raise UserError(f"the images in {', '.join(changed)} changed since {candidates} was computed from them: "
                        f"rerun its candidates stage")
    root, records = load_input(cm["input"])
    ref_sets = [load_input(r) for r in cm["references"]]
    refs: list[Record] = [rec for _, recs in ref_sets for rec in recs]
    images = pq.read_table(candidates / IMAGES).to_pydict()
    n = cm["counts"]["images"]
    names = images["name"]
    pool_pairs = _read_pairs(candidates / PAIRS)
    ref_pairs = _read_pairs(candidates / REFERENCE_PAIRS)

    keep = pool_pairs[3] >= threshold
    edges = pool_pairs[0][keep], pool_pairs[1][keep], pool_pairs[3][keep]
    ref_hits = None
    if len(ref_pairs[0]):
        keep = ref_pairs[3] >= reference_threshold
        ref_hits = ref_pairs[0][keep], ref_pairs[1][keep], ref_pairs[3][keep]
    width, height = np.asarray(images["width"][:n]), np.asarray(images["height"][:n])
    hashes, area, errors = images["pixel_sha256"][:n], width * height, images["error"][:n]
    dec = decide(hashes, area, errors, edges, ref_hits)
    sweep = []  # kept by dedup at each threshold, before the NSFW pass
    for t in sorted({*SWEEP_THRESHOLDS, threshold}):
        cut = pool_pairs[3] >= t
        at_t = pool_pairs[0][cut], pool_pairs[1][cut], pool_pairs[3][cut]
        d = dec if t == threshold else decide(hashes, area, errors, at_t, ref_hits)
        sweep.append({"threshold": t, "copy_edges": int(cut.sum()), "kept": int(d.keep.sum())})

    ref_names = names[n:]
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
            "group_size": int(dec.group_size[i]), "width": int(width[i]), "height": int(height[i]),
            "pixel_sha256": images["pixel_sha256"][i], "detail": images["detail"][i],
        })

    hygiene: dict[str, Any] = {}
    if nsfw or faces:
        from curation.hygiene import apply_hygiene

        hygiene = apply_hygiene(records, rows, nsfw=nsfw, nsfw_threshold=nsfw_threshold, faces=faces,
                                face_min_size=face_min_size, threads=threads)

    out = Path(out)
    work = work_dir(out, fresh=True)
    table = pa.Table.from_pylist(rows, schema=_schema(nsfw, faces))
    pq.write_table(table, work / OUTPUT)

    from curation.dedup.report import write_report

    by_path = {rec.path: rec for rec in records}
    by_ref = dict(zip(ref_names, refs))
    params = {"descriptor": cm["params"]["descriptor"], "threshold": threshold,
              "reference_threshold": reference_threshold, "k": cm["params"]["k"],
              "candidates_per_image": cm["params"]["candidates_per_image"]}
    rep = write_report(work, rows, params, lambda p: _load(by_path.get(p)), lambda p: _load(by_ref.get(p)),
                       sweep=sweep)

    counts: dict[str, int] = {}
    for row in rows:
        key = row["reason"] or "kept"
        key = key.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    manifest = {
        "stage": STAGE,
        "input": str(root),
        "references": cm["references"],
        "candidates": str(candidates.resolve()),
        "params": {**cm["params"], "threshold": threshold, "reference_threshold": reference_threshold,
                   "nsfw": nsfw, "nsfw_threshold": nsfw_threshold, "faces": faces, "face_min_size": face_min_size},
        "index": cm["index"],
        "counts": {
            "images": n, "reference_images": len(refs),
            "kept": int(sum(1 for row in rows if row["keep"])),
            "removed": int(sum(1 for row in rows if not row["keep"])),
            "copy_edges": int(len(edges[0])),
            "reference_hits": int(len(ref_hits[0])) if ref_hits else 0,
            **{f"reason: {k}": v for k, v in sorted(counts.items())},
        },
        "threshold_sweep": sweep,
        **hygiene,
        **rep,
        # The candidates' own seconds (describe, knn_verify) stay in their manifest: on a rerun at another
        # threshold they were not spent again.
        "seconds": {"decide": round(time.time() - t0, 2)},
        "digest": file_digest(work / OUTPUT),
    }
    return publish(work, out, manifest)


def _fingerprints(input: str | Path, references: Sequence[str | Path]) -> list[str]:
    """What the candidates were computed from: the input's and each reference's content fingerprint (a
    published stage's digest, or a folder's listing with sizes and mtimes), so that decide_dedup refuses
    candidates of images that were replaced, added or removed since, even under the same names."""
    return [fingerprint(p) for p in [input, *references]]


def _check_thresholds(threshold: float, reference_threshold: float) -> None:
    if not 0.0 < threshold <= 1.0 or not 0.0 < reference_threshold <= 1.0:
        raise UserError("thresholds must lie in (0, 1]")


def _write_pairs(path: Path, names_a: list[str], names_b: list[str], i: np.ndarray, j: np.ndarray,
                 cos: np.ndarray, score: np.ndarray) -> None:
    pq.write_table(pa.table({
        "i": pa.array(i, pa.int64()), "j": pa.array(j, pa.int64()),
        "a": pa.array([names_a[x] for x in i.tolist()], pa.string()),
        "b": pa.array([names_b[x] for x in j.tolist()], pa.string()),
        "cosine": pa.array(cos, pa.float32()),
        "score": pa.array(score, pa.float32()),
    }), path)


def _read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    t = pq.read_table(path, columns=["i", "j", "cosine", "score"])
    return tuple(t.column(c).to_numpy().copy() for c in ("i", "j", "cosine", "score"))


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

