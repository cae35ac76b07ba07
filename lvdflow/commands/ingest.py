"""`lvdflow ingest`: validate every input image; manifest for the good ones, quarantine for the rest."""

from __future__ import annotations

import argparse

from lvdflow.commands._common import add_runner_arguments, existing_path, output_dir, print_result, non_negative_int, runner_config
from lvdflow.errors import UserError

NAME = "ingest"
HELP = ("Ingest images from folders (recursive), WebDataset tar shards and .parquet/.csv lists of paths. "
        "Writes OUT/manifest.parquet (one row per good image) and OUT/quarantine.parquet (one row per "
        "rejected input, with its reason).")



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="a folder, a tar shard (.tar, .tar.gz, ...) or a .parquet/.csv list of paths "
                        "(column path/uri/file, or the first column); relative list entries resolve "
                        "against the list's folder")
    p.add_argument("--out", required=True, help="output directory (replaced atomically when complete)")
    p.add_argument("--workers", type=non_negative_int, default=None,
                   help="decoding processes (default: one per CPU; 0 decodes in the main process)")
    p.add_argument("--max-pixels", type=non_negative_int, default=100_000_000,
                   help="reject images with more pixels than this as decompression bombs (default: %(default)s)")
    p.add_argument("--min-side", type=non_negative_int, default=16,
                   help="reject images whose shorter side is below this (default: %(default)s)")
    add_runner_arguments(p)
    p.add_argument("--refresh", action="store_true", help="rerun even if a cached result exists")


def run(args: argparse.Namespace) -> int:
    from curation.sources import source_kind

    sources = [existing_path(s, "source") for s in args.sources]
    for s in sources:
        source_kind(s)  # unsupported file types fail here, in one line
    out = output_dir(args.out)
    if any(out.resolve() == s.resolve() for s in sources):
        raise UserError("--out must not be one of the sources")
    from flows.ingest import ingest_flow

    print_result(ingest_flow(sources=[str(s) for s in sources], out=str(out), workers=args.workers,
                             max_pixels=args.max_pixels, min_side=args.min_side,
                             runner=runner_config(args), refresh=["ingest"] if args.refresh else None))
    return 0
