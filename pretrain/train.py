"""The DINOv2 trainer: config-driven, one process or many (torchrun), CPU (gloo) or CUDA (NCCL).

    python -m pretrain.train --config run.json --shards SHARDS --out OUT          # one process
    torchrun --nproc-per-node 2 -m pretrain.train --config run.json --shards SHARDS --out OUT

Under torchrun each student/teacher block is sharded with FSDP2 (`fully_shard` per block, then the
backbone and each head), on CPU with gloo too. The run resumes from `OUT/checkpoints/latest` when present
(on any process count), and a run killed and resumed reproduces the uninterrupted run's losses (bitwise
on CPU in one process: batches are seeded per iteration, and model, optimizer, loss centres, RNG states
and the data position are all restored).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from lvdflow.errors import UserError
from pretrain.augment import MultiCropAugmentation
from pretrain.checkpointing import full_state_dict
from pretrain.config import TrainConfig
from pretrain.data import BatchStream, data_workers
from pretrain.distributed import is_dist, rank, world_size
from pretrain.loop import (LoopSpec, build_optimizer, eval_device, finish, knn_eval, lr_and_schedules, resume,
                           run_cli, run_loop)
from pretrain.meta_arch import SSLMetaArch
from pretrain.param_groups import param_groups


# ---- construction ------------------------------------------------------------------------------------
def build_backbone(cfg: TrainConfig, *, drop_path_rate: float | None = None):
    from pretrain.models.vit import build_vit

    overrides = {k: getattr(cfg, k) for k in ("embed_dim", "depth", "num_heads") if getattr(cfg, k)}
    return build_vit(cfg.arch, patch_size=cfg.patch_size, img_size=cfg.img_size, ffn_layer=cfg.ffn_layer,
                     init_values=cfg.layerscale or None, num_register_tokens=cfg.num_register_tokens,
                     drop_path_rate=cfg.drop_path_rate if drop_path_rate is None else drop_path_rate,
                     drop_path_uniform=cfg.drop_path_uniform, **overrides)


def build_meta_arch(cfg: TrainConfig) -> SSLMetaArch:
    meta = SSLMetaArch(build_backbone(cfg), dino_prototypes=cfg.dino_prototypes,
                       ibot_prototypes=cfg.ibot_prototypes, head_hidden_dim=cfg.head_hidden_dim,
                       head_bottleneck_dim=cfg.head_bottleneck_dim, head_nlayers=cfg.head_nlayers,
                       ibot_separate_head=cfg.ibot_separate_head, dino_weight=cfg.dino_weight,
                       ibot_weight=cfg.ibot_weight, koleo_weight=cfg.koleo_weight, centering=cfg.centering,
                       norm_last_layer=cfg.norm_last_layer, ibot_head_bottleneck_dim=cfg.ibot_head_bottleneck_dim)
    # The teacher runs without stochastic depth (DINOv2 builds it with drop_path_rate 0).
    for blk in meta.teacher["backbone"].blocks:
        blk.drop_path_rate = 0.0
    return meta


def build_augmentation(cfg: TrainConfig, highres: bool = False) -> MultiCropAugmentation:
    return MultiCropAugmentation(
        global_crops_scale=tuple(cfg.global_crops_scale), local_crops_scale=tuple(cfg.local_crops_scale),
        local_crops_number=cfg.local_crops_number,
        global_crops_size=cfg.highres_global_crops_size if highres else cfg.global_crops_size,
        local_crops_size=cfg.highres_local_crops_size if highres else cfg.local_crops_size,
        blur_probabilities=cfg.blur_probabilities, color_jitter=tuple(cfg.color_jitter),
        blur_sigma=tuple(cfg.blur_sigma))


def shard_with_fsdp2(meta: SSLMetaArch, device: torch.device) -> None:
    """FSDP2: each transformer block, then each backbone and head, of the student and of the teacher.

    Student and teacher are sharded the same way, so their local shards line up for the EMA update. The
    loss modules (centre buffers) are left unsharded and replicated.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if device.type == "cuda" else MixedPrecisionPolicy())
    for net in (meta.student, meta.teacher):
        for blk in net["backbone"].blocks:
            fully_shard(blk, mesh=mesh, mp_policy=mp)
        for name in net.keys():
            fully_shard(net[name], mesh=mesh, mp_policy=mp)


def compile_for_training(meta: torch.nn.Module) -> None:
    """torch.compile, in place, every transformer block of every network in `meta` (student and teacher,
    or a distillation's teacher and students), and the losses' passes over their (rows, K) logits.

    Regional compilation: the block is the unit that repeats, so one graph per crop shape serves all of them,
    and the loss kernels are compiled apart (losses/functional.py). The block compiles twice (grad mode: the
    teacher runs without it), with no graph break: xformers' opaque kernel would break it, so attention takes
    SDPA while Dynamo traces (pretrain/layers/attention.py). Never run the compiled model under a dispatch mode
    (FlopCounterMode, the census): on torch <= 2.11 Dynamo then skips the block's code for good and every
    later call runs eagerly (pytorch/pytorch#140909, #190286)."""
    from pretrain.layers.block import Block
    from pretrain.losses.centering import compile_loss_kernels

    for module in meta.modules():
        if isinstance(module, Block):
            module.compile()
    compile_loss_kernels(meta)


def init_distributed() -> torch.device:
    """Join the torchrun process group when launched by torchrun; pick this process's device."""
    # Under torchrun even a single process joins a group: a one-GPU job then runs the very FSDP2 / NCCL
    # code of a large one (and writes the same sharded checkpoints). Plain `python` stays undistributed.
    launched = "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def open_shard_stream(shards: str | Path, cfg: TrainConfig):
    """The training sample stream for this process: shards.reader's ShardDataset, split by rank."""
    from pretrain.data import ShardStream
    from shards.reader import ShardDataset

    try:
        # Encoded bytes: decoding is the batch makers' job (pretrain/data.py), in worker processes when there are any.
        ds = ShardDataset(shards, rank=rank(), world_size=world_size(), seed=cfg.seed, decode="bytes")
    except FileNotFoundError as exc:
        raise UserError(f"cannot read training shards: {exc}") from exc
    return ShardStream(ds)


# ---- teacher export ----------------------------------------------------------------------------------
def export_teacher(meta: SSLMetaArch, cfg: TrainConfig, dest: Path, iteration: int):
    """Collective. Rank 0 writes `teacher_backbone.pth` (this project's format: config + weights, read by
    `load_backbone` and `lvdflow eval`), `teacher_official.pth` (bare DINOv2 hub layout) and
    `teacher_checkpoint.pth` (`{"teacher": ...}` with heads, the official eval/distillation layout, plus
    `"centers"`: the DINO / iBOT centres its targets were centred with, which distillation starts from).
    Returns the unsharded teacher backbone on rank 0, None elsewhere."""
    from pretrain.models.checkpoint import EVAL_IMAGE_SIZE_KEY, export_official, save_backbone

    sd = full_state_dict(meta.teacher)
    # The loss modules are never sharded: every rank holds the same centres.
    centers = {"dino": meta.dino_loss.center.detach().cpu().clone(), "ibot": meta.ibot_loss.center.detach().cpu().clone()}
    if rank() != 0:
        return None
    backbone = build_backbone(cfg, drop_path_rate=0.0)
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")})
    dest.mkdir(parents=True, exist_ok=True)
    # The evaluation size travels with the weights: `lvdflow eval` repeats the in-training kNN's protocol.
    save_backbone(backbone, dest / "teacher_backbone.pth",
                  extra={"iteration": iteration, EVAL_IMAGE_SIZE_KEY: cfg.eval_image_size or cfg.global_crops_size})
    export_official(backbone, dest / "teacher_official.pth")
    tmp = dest / "teacher_checkpoint.pth.tmp"
    torch.save({"teacher": sd, "iteration": iteration, "centers": centers}, tmp)
    tmp.replace(dest / "teacher_checkpoint.pth")
    return backbone.eval()


# ---- the run -----------------------------------------------------------------------------------------
def train(cfg: TrainConfig, out: str | Path, *, shards: str | Path | None = None, dataset=None,
          eval_train: str | Path | None = None, eval_test: str | Path | None = None) -> dict:
    """Train (or resume) into `out`. Returns a summary dict (rank 0's view)."""
    cfg.validate()
    out = Path(out)
    device = init_distributed()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")

    torch.manual_seed(cfg.seed)  # same initial weights on every rank (FSDP shards one model)
    meta = build_meta_arch(cfg).to(device)
    if cfg.compile:
        compile_for_training(meta)
    if is_dist():
        shard_with_fsdp2(meta, device)
    torch.manual_seed(cfg.seed + 1000 * rank())  # per-rank stochastic depth draws
    optimizer = build_optimizer(param_groups(meta.student, num_layers=len(meta.student["backbone"].blocks),
                                             layer_decay=cfg.layer_decay, patch_embed_lr_mult=cfg.patch_embed_lr_mult),
                                cfg)
    global_batch = cfg.batch_size_per_rank * world_size()
    lr, sched = lr_and_schedules(cfg, global_batch)

    if dataset is None:
        if shards is None:
            raise ValueError("train() needs shards or a dataset")
        dataset = open_shard_stream(shards, cfg)
    workers = data_workers(cfg.data_workers)
    stream = BatchStream(dataset, batch_size=cfg.batch_size_per_rank, seed=cfg.seed, rank=rank(), workers=workers,
                         mask_probability=cfg.mask_probability, mask_ratio=(cfg.mask_ratio_min, cfg.mask_ratio_max))
    start = resume(out / "checkpoints", meta, optimizer, stream)

    def export(dest: Path, iteration: int) -> dict:
        backbone = export_teacher(meta, cfg, dest, iteration)
        return {"": backbone} if backbone is not None else {}

    spec = LoopSpec(model=meta, checkpointed=meta, optimizer=optimizer, sched=sched, stream=stream,
                    clip_modules=[meta.student[name] for name in meta.student.keys()],  # per submodule, as DINOv2
                    update_ema=meta.update_teacher, export=export, checkpoint_config=cfg.to_dict(),
                    build_augmentation=lambda highres: build_augmentation(cfg, highres))
    log, last_record, stop = run_loop(cfg, out, spec, device=device, start=start, global_batch=global_batch,
                                      eval_train=eval_train, eval_test=eval_test)

    summary = {"iterations_done": stop, "total_iters": cfg.total_iters, "world_size": world_size(),
               "global_batch": global_batch, "lr": lr, "last": last_record, "resumed_from": start,
               # Under FSDP2 each rank holds ~1/world of the student: local < total shows it is sharded.
               "student_params_total": sum(p.numel() for p in meta.student.parameters()),
               "student_params_local": sum((p.to_local() if hasattr(p, "to_local") else p).numel()
                                           for p in meta.student.parameters())}
    if stop == cfg.total_iters:
        backbone = export_teacher(meta, cfg, out / "teacher", cfg.total_iters)
        if rank() == 0:
            summary["teacher"] = str(out / "teacher" / "teacher_backbone.pth")
            if eval_train and eval_test:
                res = knn_eval(backbone, cfg, eval_train, eval_test, eval_device(device))
                log.log({"iteration": cfg.total_iters - 1, **res})
                summary["knn"] = res
    curves = finish(log, out)
    if rank() == 0:
        summary["curves"] = curves
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="DINOv2 pretraining (one process, or one per torchrun rank)")
    ap.add_argument("--config", required=True, help="YAML/JSON training profile")
    ap.add_argument("--shards", required=True, help="folder of WebDataset shards")
    ap.add_argument("--out", required=True, help="run directory (resumed when it holds a checkpoint)")
    ap.add_argument("--eval-train")
    ap.add_argument("--eval-test")
    ap.add_argument("--summary", help="write the summary JSON here (rank 0)")
    args = ap.parse_args(argv)
    from pretrain.config import load_config

    cfg = load_config(args.config)
    return run_cli(lambda: train(cfg, args.out, shards=args.shards, eval_train=args.eval_train,
                                 eval_test=args.eval_test), args.summary)


if __name__ == "__main__":
    raise SystemExit(main())
