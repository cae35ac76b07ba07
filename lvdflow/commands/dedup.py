"""`lvdflow dedup`: remove exact duplicates and copies, decontaminate against reference sets."""

from __future__ import annotations

import argparse

from lvdflow.commands._common import add_runner_arguments, existing_path, output_dir, print_result, positive_int, runner_config, unit_fraction
from lvdflow.errors import UserError

NAME = "dedup"
HELP = ("Copy-detection dedup (LVD-142M): exact duplicates, then copies found by a descriptor, faiss kNN, a "
        "similarity threshold and connected components; one image kept per component. --reference drops "
        "every component that copies an image of an evaluation set. Optional NSFW quarantine and face "
        "boxes. Writes OUT/dedup.parquet and OUT/report.md with image grids; the descriptors' scored candidate "
        "pairs go to OUT-candidates, so a rerun with other thresholds does not describe the images again.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="INPUT", help="a folder of images, or an ingest output (folder with manifest.parquet)")
    p.add_argument("--out", required=True, help="output directory (replaced atomically when complete)")
    p.add_argument("--candidates", metavar="DIR",
                   help="where the scored candidate pairs go, reused while input, references and descriptor "
                        "options stay the same (default: OUT-candidates)")
    p.add_argument("--reference", nargs="+", default=[], metavar="DIR",
                   help="evaluation/query image folders or ingest outputs: pool components holding a "
                        "near-copy of any of their images are dropped")
    p.add_argument("--descriptor", choices=("builtin", "sscd", "backbone"), default="builtin",
                   help="builtin: SIFT+VLAD retrieval with geometric verification, no weights; sscd: an "
                        "SSCD TorchScript file; backbone: a ViT checkpoint of the embedding stage")
    p.add_argument("--weights", help="model file for --descriptor sscd/backbone")
    p.add_argument("--threshold", type=unit_fraction, default=0.6,
                   help="similarity at which two pool images are copies (default: %(default)s, LVD-142M)")
    p.add_argument("--reference-threshold", type=unit_fraction, default=0.45,
                   help="similarity to a reference image that drops a component (default: %(default)s, LVD-142M)")
    p.add_argument("--k", type=positive_int, default=64, help="nearest neighbours searched per image (default: %(default)s)")
    p.add_argument("--index", choices=("auto", "flat", "ivf", "hnsw"), default="auto",
                   help="faiss index (auto: exact up to 200k images, IVF above)")
    p.add_argument("--nsfw", action="store_true", help="quarantine kept images NudeNet scores as NSFW")
    p.add_argument("--nsfw-threshold", type=unit_fraction, default=0.6, help="NSFW score that quarantines (default: %(default)s)")
    p.add_argument("--faces", action="store_true", help="record face boxes of kept images (column faces) for blurring")
    p.add_argument("--face-min-size", type=positive_int, default=24, help="smallest face side in pixels (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device for sscd/backbone (default: cuda if present)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="images per descriptor batch (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=None, help="decode/feature threads (default: one per CPU)")
    add_runner_arguments(p)
    p.add_argument("--refresh", action="store_true",
                   help="rerun even if a cached result exists (the candidates too)")


def run(args: argparse.Namespace) -> int:
    src = existing_path(args.input, "input")
    refs = [existing_path(r, "reference") for r in args.reference]
    if args.descriptor in ("sscd", "backbone"):
        if not args.weights:
            raise UserError(f"--descriptor {args.descriptor} needs --weights FILE")
        existing_path(args.weights, "weights file")
    elif args.weights:
        raise UserError("--weights is only used with --descriptor sscd or backbone")
    out = output_dir(args.out)
    cand = output_dir(args.candidates) if args.candidates else None
    for name, path in (("--out", out), ("--candidates", cand)):
        if path is not None and (path.resolve() == src.resolve() or any(path.resolve() == r.resolve() for r in refs)):
            raise UserError(f"{name} must not be the input or a reference folder")
    if cand is not None and cand.resolve() == out.resolve():
        raise UserError("--candidates must differ from --out")
    params = {
        "descriptor": args.descriptor, "threshold": args.threshold,
        "reference_threshold": args.reference_threshold, "k": args.k, "index": args.index, "nsfw": args.nsfw,
        "nsfw_threshold": args.nsfw_threshold, "faces": args.faces, "face_min_size": args.face_min_size,
        "device": args.device, "batch_size": args.batch_size, "threads": args.threads,
    }
    from flows.dedup import dedup_flow

    print_result(dedup_flow(input=str(src), out=str(out), references=[str(r) for r in refs] or None,
                            weights=str(args.weights) if args.weights else None, params=params,
                            runner=runner_config(args), refresh=["dedup"] if args.refresh else None,
                            candidates=str(cand) if cand else None))
    return 0
