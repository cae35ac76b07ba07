"""`lvdflow`: one subcommand per pipeline stage; each runs that stage's Prefect flow.

Each command lives in `lvdflow/commands/<name>.py` and defines NAME, HELP, `add_arguments(parser)` and
`run(args) -> int`. Commands check their paths and options before Prefect is imported, so a typo costs
a one-line message and exit status 2, not a server start and a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lvdflow.errors import UserError

# Order is the order of the pipeline; `lvdflow --help` lists them so.
COMMAND_MODULES = [
    "lvdflow.commands.demo_data",
    "lvdflow.commands.ingest",
    "lvdflow.commands.dedup",
    "lvdflow.commands.select",
    "lvdflow.commands.embed",
    "lvdflow.commands.retrieve",
    "lvdflow.commands.shard",
    "lvdflow.commands.pretrain",
    "lvdflow.commands.eval",
    "lvdflow.commands.distill",
    "lvdflow.commands.run",
]


def _prefect_defaults() -> None:
    # A fresh local SQLite server needs ~20 s on 2 cores; Prefect's 20 s default fails the first run.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # No telemetry from machines that have no internet (and no "database is locked" noise from it).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lvdflow",
        description="Curate an uncurated image pool and pretrain a self-supervised ViT. Every command runs "
        "its stage as a Prefect flow: with PREFECT_API_URL set it reports to that server (and shows in its "
        "UI), otherwise Prefect starts a temporary local server for the run.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        mod = importlib.import_module(name)
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _prefect_defaults()
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"lvdflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lvdflow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
