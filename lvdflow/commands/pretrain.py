"""`lvdflow pretrain`: DINOv2 self-supervised pretraining of a ViT on WebDataset shards."""

from __future__ import annotations

import argparse
import json

from lvdflow.commands._common import add_launch_arguments, existing_dir, output_dir, print_result, launch_kwargs
from lvdflow.errors import UserError

NAME = "pretrain"
HELP = ("Pretrain a ViT with DINOv2 (DINO + iBOT + KoLeo, EMA teacher) on WebDataset shards. Resumes from "
        "OUT's checkpoints when rerun; exports the teacher backbone (this project's and the official DINOv2 "
        "layout) and evaluates it with kNN when eval folders are given.")


def _override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value  # a bare string


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="demo",
                   help="training profile: a bundled name (demo) or a YAML/JSON file (default: %(default)s)")
    p.add_argument("--shards", required=True, help="folder of WebDataset shards written by the shard stage")
    p.add_argument("--out", required=True, help="run directory (published atomically when training completes)")
    p.add_argument("--eval-train", help="ImageFolder of labelled train images for kNN evaluation")
    p.add_argument("--eval-test", help="ImageFolder of labelled test images for kNN evaluation")
    add_launch_arguments(p)
    p.add_argument("--set", dest="overrides", action="append", type=_override, default=[], metavar="KEY=VALUE",
                   help="override a config key (JSON value), e.g. --set total_iters=100; repeatable")
    p.add_argument("--refresh", action="store_true", help="rerun even if a cached result exists")


def run(args: argparse.Namespace) -> int:
    from pretrain.config import load_config, profile_path

    shards = existing_dir(args.shards, "shard folder")
    out = output_dir(args.out)
    if bool(args.eval_train) != bool(args.eval_test):
        raise UserError("give both --eval-train and --eval-test, or neither")
    eval_train = str(existing_dir(args.eval_train, "--eval-train")) if args.eval_train else None
    eval_test = str(existing_dir(args.eval_test, "--eval-test")) if args.eval_test else None
    launch = launch_kwargs(args)
    overrides = dict(args.overrides)
    load_config(profile_path(args.config), overrides)  # bad keys/values fail here, before Prefect starts
    from flows.pretrain import pretrain_flow

    print_result(pretrain_flow(shards=str(shards), out=str(out), config=str(args.config), overrides=overrides,
                               eval_train=eval_train, eval_test=eval_test, **launch,
                               refresh=["pretrain"] if args.refresh else None))
    return 0
