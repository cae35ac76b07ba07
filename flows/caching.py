"""Cross-run caching for directory-valued stages.

Prefect hashes a `str` argument by its text, so a stage keyed on its input *path* would hit the cache
after the files behind the path changed. Here the key is built from the content fingerprint of every
input path (a published stage's digest, a file's hash, or a folder listing), the stage's own parameters,
the output location, and an explicit per-stage code version (TASK_SOURCE cannot see helper changes).
A stage whose published output went missing is rerun instead of reporting a stale cache hit, and so is one
whose cached manifest is not the one on disk (another parameter set published to the same `out` since).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from prefect.context import TaskRunContext

from lvdflow.errors import UserError
from lvdflow.stage import fingerprint, is_complete, read_manifest

# Bump a stage's version when its library code changes what it writes.
CODE_VERSION: dict[str, str] = {
    "demo-data": "2",  # 2: the small eval split is 300 + 300 per class (was 100 + 50)
    "ingest": "2",  # 2: tar members named .avif/.heic/.jxl/... are images (kept or quarantined), not side files
    "dedup-candidates": "2",  # 2: input fingerprints in the manifest, checked by the decision
    "dedup": "3",  # 2: built-in descriptor, two keypoint scales; 3: the decision alone, candidates apart
    "select": "1",
    "embed": "4",  # 2: bf16 weights + fused GELU on CUDA; 3: + patch GEMM, folded FFN residual (CPU unchanged);
    # 4: timm ViT-H/g/G files with timm's 16 heads
    "retrieve": "2",  # 2: hierarchical k-means resampling steps restart k-means (they did nothing before)
    "shard": "2",  # 2: rows written in a seeded permutation, not in input order
    # pretrain and distill 3: prototypes frozen by lr alone (AdamW sees their gradients), crops normalised on
    # device, the official vitl14 profile, a bootstrap profile that does not collapse
    "pretrain": "3",  # 2: teacher_checkpoint.pth carries the loss centres
    "distill": "3",  # 2: demo student without LayerScale, CLS feature loss, teacher centres; 3: + lr 1e-3/sqrt(2)
    "evaluate": "2",  # 2: default size the run's evaluation size (or min(224, grid)), not the 518 px grid
}

def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Bad input (a UserError) fails the same way every time: report it at once instead of retrying."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # the result could not be read back: retry, as for any other failure
        return True
    return not isinstance(exc, UserError)


# Stage tasks retry twice, after ~10 s and ~20 s (jittered): enough for a storage hiccup or a lost worker;
# every stage resumes from what its work directory already holds, so a retry does not redo finished parts.
STAGE_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [10, 20], "retry_jitter_factor": 0.5,
                                 "retry_condition_fn": _worth_retrying}

# Parameters that choose where a stage runs, not what it writes: changing them must not miss the cache.
NOT_IDENTITY = {"runner"}

def _normalise(name: str, value: Any) -> Any:
    if name == "out":
        return str(Path(value).resolve())  # where the output goes is part of the identity, by name
    if isinstance(value, (str, os.PathLike)) and str(value) and Path(value).exists():
        return fingerprint(value)
    if isinstance(value, (list, tuple)):
        return [_normalise(name + "[]", v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(k, v) for k, v in sorted(value.items())}
    return value


def stage_cache_key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
    task = ctx.task
    src = hashlib.sha256(task.fn.__code__.co_code).hexdigest()[:12]
    blob = json.dumps(
        [task.name, CODE_VERSION.get(task.name, "0"), src,
         {k: _normalise(k, v) for k, v in params.items() if k not in NOT_IDENTITY}],
        sort_keys=True,
        default=str,
    )
    return f"{task.name}-{hashlib.sha256(blob.encode()).hexdigest()[:32]}"


def run_stage(task: Callable, *, out: str, refresh: set[str] | list[str] | None = None, **params: Any) -> dict:
    """Call a cached stage task, forcing a rerun when asked, when its output is gone or incomplete, or when the
    cached manifest is not the one on disk."""
    force = (task.name in set(refresh or ())) or not is_complete(Path(out))
    # Not `refresh_cache=False` when not forced: Prefect reads PREFECT_TASKS_REFRESH_CACHE only for a task whose
    # refresh_cache is None, and an explicit False would override a user's global "refresh everything".
    result = (task.with_options(refresh_cache=True) if force else task)(out=out, **params)
    if force or _is_on_disk(result, Path(out)):
        return result
    # A cache hit for what another run replaced: every parameter variant writes to the same `out`, so after
    # A -> B -> A the record is A's while the folder holds B's. Rerun, so manifest and folder agree again.
    return task.with_options(refresh_cache=True)(out=out, **params)


def _is_on_disk(manifest: Any, out: Path) -> bool:
    """Whether `manifest` is the one published in `out` now (same digest and publication time)."""
    if not isinstance(manifest, dict):
        return True  # not a published stage's manifest: nothing to compare
    try:
        disk = read_manifest(out)
    except (OSError, ValueError):
        return False
    return all(manifest.get(k) == disk.get(k) for k in ("digest", "created"))
