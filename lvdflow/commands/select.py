"""`lvdflow select`: the ingest manifest restricted to the images dedup kept."""

from __future__ import annotations

import argparse

from lvdflow.commands._common import existing_dir, output_dir, print_result

NAME = "select"
HELP = "Write OUT/manifest.parquet: the rows of an ingest output that a dedup output kept (with face boxes)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ingest", metavar="INGEST_DIR", help="output folder of `lvdflow ingest`")
    p.add_argument("dedup", metavar="DEDUP_DIR", help="output folder of `lvdflow dedup` run on INGEST_DIR")
    p.add_argument("--out", required=True, help="output directory (replaced atomically when complete)")
    p.add_argument("--refresh", action="store_true", help="rerun even if a cached result exists")


def run(args: argparse.Namespace) -> int:
    ingest, dedup = existing_dir(args.ingest, "INGEST_DIR"), existing_dir(args.dedup, "DEDUP_DIR")
    out = output_dir(args.out)
    from flows.select import select_flow

    print_result(select_flow(ingest_dir=str(ingest), dedup_dir=str(dedup), out=str(out),
                             refresh=["select"] if args.refresh else None))
    return 0
