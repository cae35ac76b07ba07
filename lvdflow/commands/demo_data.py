"""`lvdflow demo-data`: build the demo pool, queries and eval sets from Debian's image packages."""

from __future__ import annotations

import argparse

from lvdflow.commands._common import non_negative_int, output_dir, print_result

NAME = "demo-data"
HELP = ("Build demo data from real images (Debian's dataset-fashion-mnist, openclipart-png, crawl-tiles-data): "
        "an uncurated pool with planted copies and broken files, a query set, and labelled eval sets.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (replaced atomically when complete)")
    p.add_argument("--size", choices=["tiny", "small", "medium"], default="small",
                   help="small: the whole pipeline in ~15 min on a 2-core CPU; medium: for a GPU; "
                        "tiny: tests (default: %(default)s)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of every random draw (default: %(default)s)")
    p.add_argument("--refresh", action="store_true", help="rebuild even if a cached result exists")


def run(args: argparse.Namespace) -> int:
    out = output_dir(args.out)
    from curation.demo_data import load_fashion_mnist

    load_fashion_mnist("test")  # fail in one line, before Prefect starts, when the data package is missing
    from flows.demo_data import demo_data_flow

    print_result(demo_data_flow(out=str(out), size=args.size, seed=args.seed,
                                refresh=["demo-data"] if args.refresh else None))
    return 0
