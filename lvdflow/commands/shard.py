"""`lvdflow shard`: write curated images as WebDataset tar shards for training."""

from __future__ import annotations

import argparse

from lvdflow.commands._common import add_runner_arguments, existing_path, non_negative_int, output_dir, positive_int, print_result, runner_config

NAME = "shard"
HELP = ("Write the images of a retrieve output (or of ingest manifests, concatenated) as WebDataset shards "
        "OUT/{shard:06d}.tar with their original bytes and a json per sample, a parquet index per shard and for "
        "the dataset, errors.parquet and stats.json. A rerun skips shards that are already complete.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="+", help="retrieve output (retrieved.parquet), ingest output (manifest.parquet) or "
                   "a parquet file; several are concatenated (a row whose id an earlier one holds is dropped)")
    p.add_argument("--out", required=True, help="output directory (replaced atomically when complete)")
    p.add_argument("--max-count", type=positive_int, default=10_000, help="samples per shard (default: %(default)s)")
    p.add_argument("--max-bytes", type=positive_int, default=1 << 30, help="bytes per shard, e.g. 1e9 (default: %(default)s)")
    p.add_argument("--workers", type=positive_int, default=1, help="shards written in parallel (default: %(default)s)")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--shuffle-seed", type=non_negative_int, default=0,
                       help="rows are written in this seed's permutation (default: %(default)s)")
    order.add_argument("--keep-order", action="store_true", help="write the rows in input order instead")
    add_runner_arguments(p)
    p.add_argument("--refresh", action="store_true", help="rerun even if a cached result exists")


def run(args: argparse.Namespace) -> int:
    from shards.writer import read_input_table

    sources = [existing_path(s, "source") for s in args.source]
    for source in sources:
        read_input_table(source)  # a folder without a manifest fails here, in one line
    out = output_dir(args.out)
    from flows.shard import shard_flow

    source = str(sources[0]) if len(sources) == 1 else [str(s) for s in sources]
    print_result(shard_flow(source=source, out=str(out), max_count=args.max_count, max_bytes=args.max_bytes,
                            workers=args.workers, shuffle_seed=None if args.keep_order else args.shuffle_seed,
                            runner=runner_config(args),
                            refresh=["shard"] if args.refresh else None))
    return 0
