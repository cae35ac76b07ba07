"""Argument checks shared by the subcommands: fail fast, in one line, before Prefect starts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lvdflow.errors import UserError


def existing_path(value: str, what: str = "path") -> Path:
    p = Path(value).expanduser()
    if not p.exists():
        raise UserError(f"{what} does not exist: {value}")
    return p


def existing_dir(value: str, what: str = "directory") -> Path:
    p = existing_path(value, what)
    if not p.is_dir():
        raise UserError(f"{what} is not a directory: {value}")
    return p


def output_dir(value: str) -> Path:
    p = Path(value).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"output path exists and is not a directory: {value}")
    parent = p.resolve().parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"cannot create output directory under a file: {value}")
    return p


def print_result(manifest: dict) -> None:
    """Print the stage's small manifest as JSON: scripts read it, people skim it."""
    print(json.dumps(manifest, indent=2, sort_keys=True, default=str))


def _integer(value: str) -> int:
    """An integer written plainly or as a whole float ("1e9" for byte counts)."""
    try:
        return int(value)
    except ValueError:
        pass
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if not x.is_integer():
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}")
    return int(x)


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    n = _integer(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return n


def non_negative_int(value: str) -> int:
    """argparse type: an integer >= 0."""
    n = _integer(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return n


def unit_fraction(value: str) -> float:
    """argparse type: a number in (0, 1] (similarity thresholds, scores)."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value!r}") from None
    if not 0.0 < x <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return x


RUNNER_KINDS = ("inline", "threads", "processes", "dask", "ray")


def add_runner_arguments(p: argparse.ArgumentParser) -> None:
    """Where the stage's units of work run (flows/runners.py)."""
    p.add_argument("--runner", choices=RUNNER_KINDS, default="inline",
                   help="run the stage's units as Prefect tasks on threads, processes, a Dask or a Ray cluster "
                        "(default: %(default)s, this process)")
    p.add_argument("--runner-workers", type=positive_int, default=None,
                   help="threads / processes / local Dask or Ray workers (default: one per CPU)")
    p.add_argument("--runner-address", default=None,
                   help="address of a running Dask scheduler (tcp://host:8786) or Ray cluster; default: start one")


def runner_config(args: argparse.Namespace):
    """The RunnerConfig of `add_runner_arguments`' options, or None for the default in-process run."""
    if args.runner == "inline" and not args.runner_address:
        return None
    if args.runner_address and args.runner not in ("dask", "ray"):
        raise UserError("--runner-address needs --runner dask or --runner ray")
    if args.runner == "ray":
        import importlib.util

        if importlib.util.find_spec("prefect_ray") is None:
            raise UserError("--runner ray needs the optional ray extra: pip install -e '.[ray]'")
    from flows.config import RunnerConfig

    return RunnerConfig(kind=args.runner, workers=args.runner_workers, address=args.runner_address)


def add_launch_arguments(p: argparse.ArgumentParser) -> None:
    """How training is launched: in-process, or under torchrun on one or several nodes (pretrain/launch.py)."""
    p.add_argument("--nproc", type=positive_int, default=1,
                   help="processes per node under torchrun (FSDP2): one per GPU, or CPU processes with gloo "
                        "(default: 1, in this process)")
    p.add_argument("--nnodes", type=positive_int, default=1, help="nodes (default: 1); more need --rdzv-endpoint")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="c10d rendezvous of a multi-node run")
    p.add_argument("--launcher", default="", metavar="CMD",
                   help="command that starts torchrun on every node, e.g. 'srun --nodes=4 --ntasks-per-node=1'")


def launch_kwargs(args: argparse.Namespace) -> dict:
    """The flow parameters of `add_launch_arguments`' options, checked."""
    import shlex

    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise UserError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT")
    return {"nproc": args.nproc, "nnodes": args.nnodes, "rdzv_endpoint": args.rdzv_endpoint,
            "launcher": shlex.split(args.launcher)}
