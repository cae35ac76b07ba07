"""`lvdflow run`: the whole curate-and-pretrain DAG as one flow run (what the `local` deployment runs)."""

from __future__ import annotations

import argparse
import json

from lvdflow.commands._common import print_result
from lvdflow.errors import UserError

NAME = "run"
HELP = ("Run the whole curate-and-pretrain DAG (demo data or your pool -> ingest -> dedup -> embed -> retrieve "
        "-> shard -> pretrain -> distill -> evaluate) with a profile from configs/.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="local",
                   help="configuration profile: configs/<name>.yaml or a YAML path (default: %(default)s)")
    p.add_argument("--override", action="append", default=[], metavar="JSON",
                   help='JSON object merged into the profile field by field, e.g. \'{"dedup": {"threshold": 0.5}}\' '
                        "(repeatable)")
    p.add_argument("--refresh", action="append", default=[], metavar="STAGE",
                   help="rerun this stage even if cached (repeatable; e.g. dedup, embed, pretrain)")


def run(args: argparse.Namespace) -> int:
    overrides: dict = {}
    for text in args.override:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"--override is not valid JSON ({exc.msg}): {text}") from None
        if not isinstance(value, dict):
            raise UserError(f"--override must be a JSON object: {text}")
        from flows.config import merge_overrides

        overrides = merge_overrides(overrides, value)
    from flows.config import check_refresh, load_profile

    load_profile(args.profile, overrides)  # validate before Prefect starts: one line per mistake
    check_refresh(args.refresh)
    from flows.pipeline import curate_and_pretrain

    print_result(curate_and_pretrain(profile=args.profile, overrides=overrides, refresh=args.refresh))
    return 0
