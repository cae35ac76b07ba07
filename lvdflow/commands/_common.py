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


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return n


def non_negative_int(value: str) -> int:
    """argparse type: an integer >= 0."""
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return n
