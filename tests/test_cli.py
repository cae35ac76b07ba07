"""The `lvdflow` command line: help for everything, one-line errors, stages run as Prefect flows."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lvdflow.cli import build_parser, main
from tests.image_helpers import noise_images

LVDFLOW = [sys.executable, "-m", "lvdflow.cli"]


def _sub_commands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return list(action.choices)


def test_help_lists_every_stage_and_explains_every_option():
    commands = _sub_commands()
    assert {"demo-data", "ingest"} <= set(commands)
    for name in commands:
        sub = build_parser()._subparsers._group_actions[0].choices[name]
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"{name}: option {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize("args, message", [
    (["ingest", "/no/such/folder", "--out", "x"], "source does not exist"),
    (["ingest", "/etc/hostname", "--out", "x"], "unsupported source"),
    (["demo-data", "--out", "/etc/hostname"], "not a directory"),
    (["ingest", "--out"], "expected one argument"),
    (["no-such-command"], "invalid choice"),
    (["run", "--profile", "no-such-profile"], "no profile"),
    (["run", "--override", '{"dedup": {"threshold": 7}}'], "dedup.threshold"),
    (["run", "--refresh", "dedpu"], "no stage named dedpu"),
    (["select", "/no/such/ingest", "/tmp", "--out", "x"], "INGEST_DIR does not exist"),
    (["ingest", "/tmp", "--out", "x", "--runner", "spark"], "invalid choice"),
    (["ingest", "/tmp", "--out", "x", "--runner", "threads", "--runner-address", "tcp://h:8786"],
     "--runner-address needs --runner dask"),
    (["dedup", "/tmp", "--out", "x", "--threshold", "abc"], "expected a number in (0, 1], got 'abc'"),
    # numpy's generators take no negative seed: refused here, not as a traceback from inside the stage
    (["shard", "/tmp", "--out", "x", "--shuffle-seed", "-1"], "must be >= 0"),
    (["retrieve", "--pool-embeddings", "/tmp", "--pool-manifest", "/tmp", "--queries", "/tmp", "--out", "x",
      "--seed", "-3"], "must be >= 0"),
])
def test_bad_input_gives_one_line_and_nonzero_exit(args, message):
    proc = subprocess.run(LVDFLOW + args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("kind, text, expected", [
    ("positive", "3", 3), ("positive", "1e9", 10**9), ("non_negative", "0", 0), ("unit", "0.45", 0.45),
    ("positive", "0", "must be >= 1"), ("positive", "2.5", "expected an integer"),
    ("positive", "many", "expected an integer, got 'many'"), ("non_negative", "-1", "must be >= 0"),
    ("unit", "0", "must be in (0, 1]"), ("unit", "1.5", "must be in (0, 1]"), ("unit", "nan", "must be in (0, 1]"),
])
def test_number_options_parse_or_say_what_they_expected(kind, text, expected):
    from lvdflow.commands._common import non_negative_int, positive_int, unit_fraction
    parse = {"positive": positive_int, "non_negative": non_negative_int, "unit": unit_fraction}[kind]
    if isinstance(expected, str):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(expected)):
            parse(text)
    else:
        assert parse(text) == expected


def _printed_manifest(capsys) -> dict:
    printed = capsys.readouterr().out
    return json.loads(printed[printed.index("{"): printed.rindex("}") + 1])


@pytest.mark.usefixtures("prefect_server")
def test_ingest_command_runs_the_flow(tmp_path, capsys):
    src = noise_images(tmp_path / "src", 3)
    (src / "broken.jpg").write_bytes(b"nope")
    assert main(["ingest", str(src), "--out", str(tmp_path / "out"), "--workers", "0"]) == 0
    manifest = _printed_manifest(capsys)
    assert manifest["counts"]["images"] == 3 and manifest["quarantine_reasons"] == {"not-an-image": 1}
    assert (Path(manifest["dir"]) / "manifest.parquet").is_file()


@pytest.mark.usefixtures("prefect_server")
def test_shard_command_on_a_thread_runner_writes_one_task_per_shard(tmp_path, capsys):
    src = noise_images(tmp_path / "src", 5, seed=1)
    assert main(["ingest", str(src), "--out", str(tmp_path / "ingest"), "--workers", "0"]) == 0
    capsys.readouterr()
    assert main(["shard", str(tmp_path / "ingest"), "--out", str(tmp_path / "shards"), "--max-count", "2",
                 "--runner", "threads", "--runner-workers", "2"]) == 0
    manifest = _printed_manifest(capsys)
    assert manifest["counts"]["shards"] == 3 and manifest["counts"]["samples"] == 5
    assert sorted(p.name for p in Path(manifest["dir"]).glob("*.tar")) == [f"{i:06d}.tar" for i in range(3)]
