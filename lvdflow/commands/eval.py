"""`lvdflow eval knn|linear`: frozen-feature evaluation of a backbone checkpoint on ImageFolder sets.

Runs directly (no Prefect flow): it reads a checkpoint and two folders and prints one JSON object.
"""

from __future__ import annotations

import argparse
import json

from lvdflow.commands._common import existing_dir, existing_path, positive_int

NAME = "eval"
HELP = ("Evaluate a backbone checkpoint (this project's, official DINOv2 or timm layout) on frozen features: "
        "kNN (k=10,20, T=0.07, weighted vote) or a linear probe, on ImageFolder train/test folders. Prints JSON "
        "with the top-1 accuracies.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=["knn", "linear"], help="kNN classifier or linear probe")
    p.add_argument("--checkpoint", required=True, help="backbone checkpoint (e.g. OUT/teacher/teacher_backbone.pth)")
    p.add_argument("--train", required=True, help="ImageFolder of labelled train images (DIR/<class>/<image>)")
    p.add_argument("--test", required=True, help="ImageFolder of labelled test images")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="evaluation resolution (default: the size saved in this project's exports, i.e. the run's "
                        "eval_image_size or global_crops_size; otherwise 224, DINOv2's protocol, or the "
                        "position-embedding grid when smaller)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    ckpt = existing_path(args.checkpoint, "checkpoint")
    train, test = existing_dir(args.train, "--train"), existing_dir(args.test, "--test")
    from pretrain.evaluate import evaluate_checkpoint

    print(json.dumps(evaluate_checkpoint(ckpt, train, test, args.kind, args.image_size, args.device),
                     indent=2, sort_keys=True))
    return 0
