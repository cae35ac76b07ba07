"""`lvdflow embed`: one L2-normalised float16 embedding per ingested image, from a ViT backbone."""

from __future__ import annotations

import argparse

from lvdflow.commands._common import add_runner_arguments, existing_path, non_negative_int, output_dir, print_result, positive_int, runner_config
from lvdflow.errors import UserError

NAME = "embed"
HELP = ("Embed every image of an ingest manifest with a ViT backbone (official DINOv2 .pth, timm "
        ".safetensors or an lvdflow checkpoint). Writes OUT/shards/*.npy (float16, L2-normalised), "
        "OUT/index.parquet (id, shard, row) and OUT/quarantine.parquet; resumes after a crash.")


# pretrain.models.vit.ARCHS, spelled out so that `lvdflow --help` need not import torch (a test keeps them equal).
ARCH_CHOICES = ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant2")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", metavar="MANIFEST", help="an ingest output directory, or its manifest.parquet")
    p.add_argument("--weights", metavar="CKPT", help="backbone checkpoint; its architecture is read from it")
    p.add_argument("--out", required=True, help="output directory (replaced atomically when complete)")
    p.add_argument("--arch", default="vit_huge", choices=ARCH_CHOICES,
                   help="architecture for --allow-random-init (default: %(default)s)")
    p.add_argument("--patch-size", type=positive_int, default=14, help="patch size for --allow-random-init")
    p.add_argument("--img-size", type=positive_int, default=224,
                   help="embedding resolution: resize to 256/224 of it, centre crop (default: %(default)s)")
    p.add_argument("--num-heads", type=positive_int, default=None,
                   help="attention heads, when the checkpoint's are not width/64 (e.g. 16 for timm ViT-H/14)")
    p.add_argument("--allow-random-init", action="store_true",
                   help="without --weights, embed with a seeded random model (smoke tests only)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per forward (default: %(default)s)")
    p.add_argument("--workers", type=non_negative_int, default=None,
                   help="decode processes (default: one per CPU on GPU, half the CPUs on CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--shard-size", type=positive_int, default=50_000,
                   help="embeddings per .npy shard, the unit of resumption (default: %(default)s)")
    add_runner_arguments(p)
    p.add_argument("--refresh", action="store_true", help="rerun even if a cached result exists")


def run(args: argparse.Namespace) -> int:
    manifest = existing_path(args.manifest, "manifest")
    weights = existing_path(args.weights, "weights file") if args.weights else None
    if weights is None and not args.allow_random_init:
        raise UserError("--weights CKPT is required (or --allow-random-init for a smoke test)")
    if weights is not None and not weights.is_file():
        raise UserError(f"weights is not a file: {args.weights}")
    out = output_dir(args.out)
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    from flows.embed import embed_flow

    print_result(embed_flow(manifest=str(manifest), weights=str(weights) if weights else None, out=str(out),
                            arch=args.arch, patch_size=args.patch_size, img_size=args.img_size,
                            num_heads=args.num_heads, allow_random_init=args.allow_random_init,
                            batch_size=args.batch_size, num_workers=args.workers, device=args.device,
                            shard_size=args.shard_size, runner=runner_config(args),
                            refresh=["embed"] if args.refresh else None))
    return 0
