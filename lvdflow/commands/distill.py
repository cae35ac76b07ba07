"""`lvdflow distill`: distil a pretrained teacher into one or several smaller ViTs (DINOv2 §5)."""

from __future__ import annotations

import argparse

from lvdflow.commands._common import add_launch_arguments, existing_dir, existing_path, output_dir, launch_kwargs, positive_int, print_result
from lvdflow.errors import UserError

NAME = "distill"
HELP = ("Distil a frozen teacher (a pretraining run or its teacher_checkpoint.pth, heads included; or a bare "
        "backbone, given fresh heads) into smaller ViTs with the DINO, iBOT and KoLeo losses, several students "
        "from one teacher pass. Writes OUT/students/<arch>/student_{backbone,official,checkpoint}.pth (the "
        "students' EMA), metrics and checkpoints; a rerun resumes from the last checkpoint.")

# pretrain.models.vit.ARCHS, spelled out so that `lvdflow --help` need not import torch.
ARCH_CHOICES = ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant2")


def _archs(value: str) -> list[str]:
    archs = [a.strip() for a in value.split(",") if a.strip()]
    bad = [a for a in archs if a not in ARCH_CHOICES]
    if not archs or bad:
        raise argparse.ArgumentTypeError(f"students must be comma-separated names from {', '.join(ARCH_CHOICES)}, "
                                         f"got {value!r}")
    return archs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, metavar="CKPT",
                   help="pretraining run directory, a teacher_checkpoint.pth, or a backbone checkpoint")
    p.add_argument("--arch", type=_archs, default=None,
                   help="student architectures, comma-separated, e.g. vit_tiny,vit_small (default: the profile's)")
    p.add_argument("--shards", required=True, help="folder of WebDataset shards (lvdflow shard output)")
    p.add_argument("--out", required=True, help="output directory (replaced atomically when complete)")
    p.add_argument("--config", default="distill_demo",
                   help="profile name in pretrain/configs or a YAML/JSON file (default: %(default)s)")
    p.add_argument("--iters", type=positive_int, default=None, help="total iterations (default: the profile's)")
    p.add_argument("--masking", choices=("off", "on"), default=None,
                   help="student input masking with iBOT on masked patches (on, as DINOv3) or none with iBOT on "
                        "all global-crop patches (off, the paper's choice; default: the profile's)")
    p.add_argument("--teacher-heads", choices=("auto", "fresh"), default=None,
                   help="auto: the teacher checkpoint's trained heads; fresh: new seeded heads on its backbone "
                        "(for a teacher whose heads collapsed; default: the profile's)")
    p.add_argument("--eval-train", help="ImageFolder for kNN evaluation of each student at the end")
    p.add_argument("--eval-test", help="ImageFolder of the kNN test split")
    add_launch_arguments(p)
    p.add_argument("--refresh", action="store_true", help="rerun even if a cached result exists")


def run(args: argparse.Namespace) -> int:
    teacher = existing_path(args.teacher, "teacher")
    shards = existing_dir(args.shards, "shards")
    if not any(shards.glob("*.tar")):
        raise UserError(f"no .tar shards in {shards}")
    if args.iters is not None and args.iters < 1:
        raise UserError(f"--iters must be >= 1, got {args.iters}")
    if bool(args.eval_train) != bool(args.eval_test):
        raise UserError("--eval-train and --eval-test go together")
    evals = [existing_dir(d, "evaluation folder") for d in (args.eval_train, args.eval_test) if d]
    out = output_dir(args.out)
    from pretrain.config import profile_path
    from pretrain.distill.config import load_distill_config
    from pretrain.distill.teacher import resolve_teacher_path

    resolve_teacher_path(teacher)  # a folder without a teacher checkpoint fails here, in one line
    overrides: dict = {}
    if args.arch:
        overrides["students"] = args.arch
    if args.iters:
        overrides["total_iters"] = args.iters
    if args.teacher_heads:
        overrides["teacher_heads"] = args.teacher_heads
    if args.masking:
        overrides["masking"] = args.masking == "on"
    load_distill_config(profile_path(args.config), overrides)  # config errors before Prefect starts
    from flows.distill import distill_flow

    print_result(distill_flow(teacher=str(teacher), shards=str(shards), out=str(out), config=args.config,
                              overrides=overrides, eval_train=str(evals[0]) if evals else None,
                              eval_test=str(evals[1]) if evals else None, **launch_kwargs(args),
                              refresh=["distill"] if args.refresh else None))
    return 0
