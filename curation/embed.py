"""Embedding stage: one L2-normalised float16 vector per manifest image, written in resumable shards.

    run_embed("runs/x/ingest", weights="dinov2_vith14.pth", out="runs/x/embed")

- Images are read and decoded by DataLoader workers (`curation.decode`, the same decoding as ingest) and
  transformed with the fixed eval transform at the model's resolution (curation/embed_data.py).
- On CUDA: pinned memory, non-blocking copies, bf16 weights and activations (`CUDA_INFERENCE`), compiled
  blocks by default, and the copy of batch k's results back to the host overlapped with batch k+1's
  forward. On CPU: float32.
- The embedding is the backbone's normalised CLS token (`x_norm_clstoken`), stored through
  `curation.embedding_store` (float16, L2-normalised, `.npy` shards + index.parquet, manifest order).
- Resumable at shard granularity: shard s holds manifest rows [s*shard_size, (s+1)*shard_size); each shard
  is written atomically, and a rerun skips the complete ones. Batches never straddle shards and always
  start at a shard's first row, so a resumed run computes every shard with exactly the batches an
  uninterrupted run uses: same bytes, no missing or duplicated rows. A `job.json` in the work directory
  pins the inputs and parameters; a leftover from a different job is discarded, not mixed in.
- Rows that fail to read or decode at this point (the file changed since ingest) are listed in
  quarantine.parquet with a reason instead of stopping the run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader

from curation import embedding_store as store
from curation.decode import DEFAULT_MAX_PIXELS
from curation.embed_data import DeviceTransform, ManifestImages, collate, worker_init
from curation.ingest import read_manifest_table
from lvdflow.errors import UserError
from lvdflow.parts import MapUnits, in_daemon_process
from lvdflow.stage import dir_digest, file_digest, publish, work_dir, write_json_atomic
from pretrain.layers import use_gelu_epilogue
from pretrain.models import VisionTransformer, build_vit, load_backbone

log = logging.getLogger(__name__)

JOB = "job.json"
QUARANTINE = "quarantine.parquet"
FAILED_SUFFIX = ".failed.json"

# Production default: ViT-H/14 at 224 (DINOv2 curation used a ViT-H embedder); the demo passes a small arch.
DEFAULT_ARCH = "vit_huge"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but no CUDA device is available")
    return dev


def build_embedder(
    weights: str | os.PathLike | None,
    *,
    arch: str = DEFAULT_ARCH,
    patch_size: int = 14,
    img_size: int = 224,
    num_heads: int | None = None,
    allow_random_init: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> VisionTransformer:
    """The backbone to embed with: loaded from `weights`, or (only when explicitly allowed) random."""
    if weights is not None:
        return load_backbone(weights, num_heads=num_heads)
    if not allow_random_init:
        raise UserError(
            "no --weights given: embeddings from a random model are meaningless for curation; "
            "pass a checkpoint, or --allow-random-init for a smoke test"
        )
    torch.manual_seed(seed)  # a resumed random-init run must rebuild the very same model
    kw: dict[str, Any] = {"patch_size": patch_size, "img_size": img_size}
    if num_heads:
        kw["num_heads"] = num_heads
    try:
        with torch.device(device):  # initialised where it runs: a CPU init of ViT-H's 630M weights is slow
            return build_vit(arch, **kw).eval()
    except ValueError as exc:
        raise UserError(str(exc)) from None


def prepare_for_inference(
    model: VisionTransformer, device: torch.device, compile: bool, *, bf16_weights: bool = False,
    gelu_epilogue: bool = False, tune_kernels: bool = False, compile_scope: str = "blocks",
    compile_mode: str | None = None, patch_matmul: bool = False, fold_residual: bool = False,
) -> VisionTransformer:  # fmt: skip
    """Eval mode on `device`.

    - `compile`: each transformer block compiled (`compile_scope="blocks"`, regional compilation: the
      identical blocks share one graph, so compiling ViT-H costs one block's compile, not 32), or the whole
      `forward_features` (`"model"`: lets Inductor fuse across block boundaries, at a longer compile);
      `compile_mode` is torch.compile's mode (None: the default). `tune_kernels` (with the default mode)
      lets Inductor tune the block sizes of the kernels it generates (coordinate descent): its LayerNorm
      kernels ran at a third of the memory bandwidth untuned (profile on an H100), +3% images/s overall.
    - `bf16_weights` (CUDA): weights, and so the residual stream, in bf16 instead of bf16 autocast over
      float32 weights, where the LayerNorm/residual kernels move float32 activations.
    - `gelu_epilogue` (with bf16 weights): fc1 + GELU as one cuBLASLt matmul (pretrain/layers/fused_ops.py).
    - `patch_matmul`: the patch embedding as a matmul over unfolded patches instead of a convolution.
    - `fold_residual`: each block's second residual add done by the fc2 GEMM itself, LayerScale folded into
      fc2's weight (Block.fold_ffn_residual).
    With compiled blocks, the token preparation (patch embedding, CLS concatenation, position embeddings)
    is compiled as a region of its own too, so Inductor fuses its copies and adds.
    """
    if compile_scope not in ("blocks", "model"):
        raise ValueError(f"compile_scope must be 'blocks' or 'model', not {compile_scope!r}")
    model = model.to(device).eval()
    if bf16_weights and device.type == "cuda":
        model = model.to(torch.bfloat16)
        use_gelu_epilogue(model, gelu_epilogue)
    model.patch_embed.as_matmul = patch_matmul
    for blk in model.blocks:  # after the last dtype/device move: the folded weights are derived copies
        blk.fold_ffn_residual(fold_residual)
    if compile:
        kw: dict[str, Any] = {"mode": compile_mode}
        if tune_kernels and compile_mode is None:
            kw = {"options": {"coordinate_descent_tuning": True}}  # for this compilation only
        if compile_scope == "model":
            model.forward_features = torch.compile(model.forward_features, **kw)
        else:
            for blk in model.blocks:
                blk.compile(**kw)
            model.prepare_tokens_with_masks = torch.compile(model.prepare_tokens_with_masks, **kw)
    return model


# The stage's inference on CUDA, from H100 measurements of ViT-H/14 (bench/profile_embed_gpu.py): bf16
# weights (autocast kept the residual stream in float32), fc1+GELU fused, Inductor's kernels tuned, the
# patch embedding as a GEMM, the FFN's residual add inside the fc2 GEMM.
CUDA_INFERENCE = {"bf16_weights": True, "gelu_epilogue": True, "tune_kernels": True, "patch_matmul": True,
                  "fold_residual": True}  # fmt: skip


def embed_batch(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Normalised images -> float32 CLS embeddings: bf16 on CUDA (autocast over float32 weights, or bf16
    input for a model already cast to bf16), float32 elsewhere."""
    if x.device.type == "cuda" and model.cls_token.dtype == torch.bfloat16:
        x = x.to(torch.bfloat16)
    autocast = x.device.type == "cuda" and x.dtype == torch.float32
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        return model.forward_features(x)["x_norm_clstoken"].float()


class _ShardBatches:
    """Batch sampler: consecutive rows, restarting at every shard's first row, as (index, source, member)
    items for `ManifestImages`. Lazy: a manifest of 100M rows costs no list of 100M items."""

    def __init__(
        self, shards: list[int], n: int, shard_size: int, batch_size: int, sources: Any, members: Any
    ) -> None:
        self.shards, self.n, self.shard_size, self.batch_size = shards, n, shard_size, batch_size
        self.sources, self.members = sources, members  # Arrow arrays, read in this process only

    def _bounds(self, s: int) -> tuple[int, int]:
        return s * self.shard_size, min((s + 1) * self.shard_size, self.n)

    def __iter__(self) -> Iterator[list[int]]:
        for s in self.shards:
            lo, hi = self._bounds(s)
            for b in range(lo, hi, self.batch_size):
                k = min(b + self.batch_size, hi) - b
                src, mem = self.sources.slice(b, k).to_pylist(), self.members.slice(b, k).to_pylist()
                yield list(zip(range(b, b + k), src, mem))

    def __len__(self) -> int:
        return sum(-(-(hi - lo) // self.batch_size) for lo, hi in map(self._bounds, self.shards))


class _Embedder:
    """Runs batches through the model; `submit` returns the previous batch's results (one-batch lag on
    CUDA, so the host waits for batch k's copy while the GPU already runs batch k+1).

    With compiled blocks every forward gets exactly `batch_size` images: a shard's short last batch is
    padded with zero images (their outputs dropped). Otherwise each new batch size would trigger a
    recompilation (seconds, with a dynamic-shape graph after the first) in the middle of the run.
    """

    def __init__(
        self, model: VisionTransformer, device: torch.device, compile: bool, transform: DeviceTransform,
        batch_size: int,
    ) -> None:  # fmt: skip
        self.device = device
        self.cuda = device.type == "cuda"
        self.model = prepare_for_inference(model, device, compile, **(CUDA_INFERENCE if self.cuda else {}))
        self.transform = transform
        self.static_batch = batch_size if compile else None
        self.pending: tuple[Any, ...] | None = None

    @torch.inference_mode()
    def _forward(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        x = self.transform(images)
        n = x.shape[0]
        if self.static_batch and n < self.static_batch:
            x = torch.cat([x, x.new_zeros((self.static_batch - n, *x.shape[1:]))])
        return embed_batch(self.model, x)[:n]

    def submit(self, item: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
        """item: (indices, images, reasons) or None to flush. Returns (indices, vectors, reasons) or None."""
        done = None
        if item is not None:
            idx, images, reasons = item
            feats = self._forward(images)
            if not self.cuda:  # nothing runs asynchronously on CPU: no lag
                return idx, feats.numpy(), reasons
            host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
            host.copy_(feats, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            new = (idx, host, reasons, ev)
        else:
            new = None
        if self.pending is not None:
            idx, vec, reasons, ev = self.pending
            ev.synchronize()
            done = (idx, vec.numpy(), reasons)
        self.pending = new
        return done


def _job_identity(manifest_file: Path, weights: Path | None, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "manifest_sha256": file_digest(manifest_file),
        "weights_sha256": file_digest(weights) if weights else None,
        **params,
    }


def _prepare_work(out: Path, job: dict[str, Any]) -> Path:
    work = work_dir(out)
    job_file = work / JOB
    if job_file.exists():
        try:
            old = json.loads(job_file.read_text())
        except ValueError:
            old = None
        if old != job:
            log.warning("embed: %s holds a different job; starting over", work)
            shutil.rmtree(work)
            work = work_dir(out)
    write_json_atomic(work / JOB, job)
    return work


def _write_shard(work: Path, shard: int, ids: list[str], vecs: list[np.ndarray], failed: list[dict], dim: int) -> None:
    # The failure list goes first: the shard's .npy (written last by the store) marks the whole shard done.
    fail_path = store.shard_path(work, shard).with_suffix(FAILED_SUFFIX)
    fail_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(fail_path, failed)
    arr = np.stack(vecs) if vecs else np.zeros((0, dim), np.float32)
    store.write_shard(work, shard, ids, arr)


def _collect_failures(work: Path) -> list[dict]:
    rows: list[dict] = []
    for s in store.completed_shards(work):
        rows.extend(json.loads(store.shard_path(work, s).with_suffix(FAILED_SUFFIX).read_text()))
    return rows


def make_loader(table: pa.Table, todo: list[int], *, shard_size: int, batch_size: int, num_workers: int,
                img_size: int, max_pixels: int, resize_on_device: bool, pin_memory: bool) -> DataLoader:
    """The stage's DataLoader over the manifest rows of shards `todo`: batches of uint8 images (resized
    and cropped by the workers unless `resize_on_device`), as (indices, images, reasons)."""
    dataset = ManifestImages(crop=img_size, max_pixels=max_pixels, resize_on_device=resize_on_device)
    sampler = _ShardBatches(todo, table.num_rows, shard_size, batch_size, table.column("source").combine_chunks(),
                            table.column("member").combine_chunks())  # fmt: skip
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        # Spawned, not forked: a stage often runs in a non-main thread (Prefect runs tasks so), and children
        # forked from there can fail in interpreter shutdown (exit code 1, seen under Prefect). Not the
        # forkserver either: its children outlive a kill -9 of this process (they watch their parent, the
        # forkserver, which waits for them). Spawned workers see this process die and exit.
        multiprocessing_context="spawn" if num_workers else None,
        collate_fn=collate,
        pin_memory=pin_memory,
        worker_init_fn=worker_init if num_workers else None,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )


def _embed_shards(model: VisionTransformer, dev: torch.device, table: pa.Table, todo: list[int], work: Path, *,
                  shard_size: int, batch_size: int, num_workers: int | None, img_size: int, max_pixels: int,
                  resize_on_device: bool, compile: bool | None, progress: Callable[[int, int], None] | None,
                  rows_done: int = 0, stop_after_shards: int | None = None) -> bool:
    """Embed the manifest rows of shards `todo` and write each shard as soon as its last row is in.
    Returns True when stopped early by `stop_after_shards` (tests)."""
    # Arrow arrays, not Python lists: millions of Python strings cost ~10x their bytes.
    ids, uris = table.column("id").combine_chunks(), table.column("uri").combine_chunks()
    n = len(ids)
    cuda = dev.type == "cuda"
    if num_workers is None:
        num_workers = min(os.cpu_count() or 1, 32) if cuda else max(1, (os.cpu_count() or 2) // 2)
    threads_before = torch.get_num_threads()
    if not cuda:  # leave the decode workers their cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - num_workers) if num_workers else (os.cpu_count() or 1))
    loader = make_loader(table, todo, shard_size=shard_size, batch_size=batch_size, num_workers=num_workers,
                         img_size=img_size, max_pixels=max_pixels, resize_on_device=resize_on_device,
                         pin_memory=cuda)  # fmt: skip
    transform = DeviceTransform(img_size, dev, resize_on_device)
    embedder = _Embedder(model, dev, compile=cuda if compile is None else compile, transform=transform,
                         batch_size=batch_size)  # fmt: skip
    dim = model.embed_dim

    # Per-shard accumulation; a shard is written as soon as its last row is in.
    acc: dict[int, dict[str, list]] = {}
    new_shards = 0
    t0 = time.perf_counter()

    def consume(result: tuple[Any, ...]) -> bool:
        nonlocal rows_done, new_shards
        idx, vecs, reasons = result
        lo, count = int(idx[0]), len(idx)  # batches are consecutive rows
        s = lo // shard_size
        a = acc.setdefault(s, {"ids": [], "vecs": [], "failed": [], "seen": 0})
        batch_ids = ids.slice(lo, count).to_pylist()
        for j, reason in enumerate(reasons):
            if reason:
                a["failed"].append({"id": batch_ids[j], "uri": uris[lo + j].as_py(), "reason": reason})
            else:
                a["ids"].append(batch_ids[j])
                a["vecs"].append(vecs[j])
        a["seen"] += count
        rows_done += count
        if progress:
            progress(rows_done, n)
        if a["seen"] == min((s + 1) * shard_size, n) - s * shard_size:
            _write_shard(work, s, a["ids"], a["vecs"], a["failed"], dim)
            del acc[s]
            new_shards += 1
            rate = rows_done / max(time.perf_counter() - t0, 1e-9)
            log.info("embed: shard %d written (%d/%d images, %.0f img/s)", s, rows_done, n, rate)
            if stop_after_shards is not None and stop_after_shards <= new_shards < len(todo):
                return True
        return False

    stopped = False
    last = len(loader) - 1
    try:
        for i, batch in enumerate(loader):
            results = [embedder.submit(batch)]
            if i == last:  # collect it now: the loader's next step first shuts its workers down (~1.5 s)
                results.append(embedder.submit(None))
            if any(res is not None and consume(res) for res in results):
                stopped = True
                break
        if not stopped:
            res = embedder.submit(None)
            if res is not None:
                stopped = consume(res)
    finally:
        torch.set_num_threads(threads_before)
    if acc:
        raise RuntimeError(f"embed: shards {sorted(acc)} incomplete after the loader finished")  # a bug, not input
    return stopped


@dataclass(frozen=True)
class EmbedUnitSpec:
    """What a unit of `run_embed` needs to rebuild the job in another process (all picklable)."""
    manifest: str
    weights: str | None
    arch: str
    patch_size: int
    img_size: int
    num_heads: int | None
    allow_random_init: bool
    seed: int
    device: str
    work: str
    shard_size: int
    batch_size: int
    num_workers: int | None
    compile: bool | None
    resize_on_device: bool
    max_pixels: int


def _file_stamp(path: str | None) -> tuple[int, int] | None:
    if path is None:
        return None
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _unit_inputs(spec: EmbedUnitSpec) -> tuple[VisionTransformer, pa.Table]:
    # The files' stamps join the key: a long-lived worker (Dask, Ray) embedding again at the same paths, after
    # a new ingest or retrained weights, must not reuse the model and table it loaded for the last job.
    return _cached_unit_inputs(spec, _file_stamp(spec.manifest), _file_stamp(spec.weights))


@lru_cache(maxsize=1)
def _cached_unit_inputs(spec: EmbedUnitSpec, *stamps: tuple[int, int] | None) -> tuple[VisionTransformer, pa.Table]:
    # Once per worker process and job, not once per shard: a ViT-H checkpoint is 2.5 GB to read.
    model = build_embedder(spec.weights, arch=spec.arch, patch_size=spec.patch_size, img_size=spec.img_size,
                           num_heads=spec.num_heads, allow_random_init=spec.allow_random_init, seed=spec.seed,
                           device=resolve_device(spec.device))
    return model, read_manifest_table(spec.manifest)


def embed_shard_unit(spec: EmbedUnitSpec, shard: int) -> int:
    """One unit of `run_embed` for another executor: embeds shard `shard` into the job's work directory
    (a no-op when that shard is already complete). Returns the shard."""
    work = Path(spec.work)
    if shard in set(store.completed_shards(work)):
        return shard
    dev = resolve_device(spec.device)
    model, table = _unit_inputs(spec)
    # A daemonic worker (Dask's) may not start DataLoader workers: decode in this process then.
    num_workers = 0 if in_daemon_process() else spec.num_workers
    _embed_shards(model, dev, table, [shard], work, shard_size=spec.shard_size,
                  batch_size=spec.batch_size, num_workers=num_workers, img_size=spec.img_size,
                  max_pixels=spec.max_pixels, resize_on_device=spec.resize_on_device, compile=spec.compile,
                  progress=None)
    return shard


def run_embed(
    manifest_path: str | os.PathLike,
    weights: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    arch: str = DEFAULT_ARCH,
    patch_size: int = 14,
    img_size: int = 224,
    num_heads: int | None = None,
    allow_random_init: bool = False,
    batch_size: int = 256,
    num_workers: int | None = None,
    device: str = "auto",
    shard_size: int = 50_000,
    compile: bool | None = None,
    resize_on_device: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    stop_after_shards: int | None = None,
    map_units: MapUnits | None = None,
) -> dict[str, Any]:
    """Embed every image of an ingest manifest (a directory holding manifest.parquet, or the file) into `out`.

    `weights`: a backbone checkpoint (any layout `pretrain.models.load_backbone` reads); the architecture
    comes from it. Without weights, `allow_random_init=True` builds `arch`/`patch_size` at random (seeded),
    for smoke tests only. `img_size`: the crop the images are embedded at. `compile` (default: on CUDA)
    compiles the transformer blocks. `resize_on_device` leaves only decoding to the workers and
    resizes on the device (curation/embed_data.py; measured slower on an H100 with 16 CPUs, so off). `progress(done, total)` is called after each batch. For tests,
    `stop_after_shards` returns after that many new shards without publishing (as a crash would).
    `map_units` (lvdflow/parts.py) embeds the shards elsewhere, one unit per shard, each loading the model.
    Returns the stage manifest.
    """
    if batch_size < 1 or shard_size < 1:
        raise UserError("batch_size and shard_size must be positive")
    if img_size % patch_size and weights is None:
        raise UserError(f"img_size {img_size} is not a multiple of the patch size {patch_size}")
    table = read_manifest_table(manifest_path)
    manifest_file = Path(manifest_path) / "manifest.parquet" if Path(manifest_path).is_dir() else Path(manifest_path)
    missing = {"id", "source", "member", "uri"} - set(table.column_names)
    if missing:
        raise UserError(f"{manifest_file} lacks the columns {sorted(missing)}: not an ingest manifest")
    weights_path = Path(weights) if weights is not None else None
    if weights_path is not None and not weights_path.is_file():
        raise UserError(f"weights file not found: {weights}")
    dev = resolve_device(device)
    model = build_embedder(weights_path, arch=arch, patch_size=patch_size, img_size=img_size,
                           num_heads=num_heads, allow_random_init=allow_random_init, seed=seed, device=dev)  # fmt: skip
    if img_size % model.patch_size:
        raise UserError(f"img_size {img_size} is not a multiple of the model's patch size {model.patch_size}")
    model_cfg = model.config.to_dict()
    resize_on_device = bool(resize_on_device)
    params = {"img_size": img_size, "shard_size": shard_size, "batch_size": batch_size, "device": dev.type,
              "precision": "bf16" if dev.type == "cuda" else "fp32", "model": model_cfg,
              "resize_on_device": resize_on_device,
              "random_init_seed": None if weights_path else seed}  # fmt: skip
    out = Path(out)
    work = _prepare_work(out, _job_identity(manifest_file, weights_path, params))

    n = table.num_rows
    n_shards = (n + shard_size - 1) // shard_size
    done_shards = set(store.completed_shards(work))
    todo = [s for s in range(n_shards) if s not in done_shards]
    rows_done = sum(min((s + 1) * shard_size, n) - s * shard_size for s in done_shards if s < n_shards)
    if done_shards:
        log.info("embed: resuming, %d of %d shards already complete", len(done_shards), n_shards)

    if map_units is None:
        stopped = _embed_shards(model, dev, table, todo, work, shard_size=shard_size, batch_size=batch_size,
                                num_workers=num_workers, img_size=img_size, max_pixels=max_pixels,
                                resize_on_device=resize_on_device, compile=compile, progress=progress,
                                rows_done=rows_done, stop_after_shards=stop_after_shards)
    else:
        del model  # each unit loads its own copy where it runs
        spec = EmbedUnitSpec(str(manifest_file), str(weights_path) if weights_path else None, arch, patch_size,
                             img_size, num_heads, allow_random_init, seed, device, str(work), shard_size,
                             batch_size, num_workers, compile, resize_on_device, max_pixels)
        map_units(partial(embed_shard_unit, spec), todo)
        stopped = False
    if stopped:
        return {"stage": "embed", "stopped_early": True, "shards_written": stop_after_shards}

    n_rows = store.write_index(work)
    failures = _collect_failures(work)
    pq.write_table(
        pa.table({k: pa.array([f[k] for f in failures], pa.string()) for k in ("id", "uri", "reason")}),
        work / QUARANTINE,
    )
    (work / JOB).unlink()
    reasons: dict[str, int] = {}
    for f in failures:
        reasons[f["reason"]] = reasons.get(f["reason"], 0) + 1
    manifest = {
        "stage": "embed",
        "manifest": str(manifest_file.resolve()),
        "weights": str(weights_path.resolve()) if weights_path else None,
        "params": {k: v for k, v in params.items() if k != "model"},
        "model": model_cfg,
        "dim": model_cfg["embed_dim"],
        "counts": {"images": n, "embedded": n_rows, "failed": len(failures), "shards": n_shards},
        "quarantine_reasons": dict(sorted(reasons.items())),
        "outputs": {"index": store.INDEX, "shards": store.SHARD_DIR, "quarantine": QUARANTINE},
        "digest": dir_digest(work),
    }
    return publish(work, out, manifest)
