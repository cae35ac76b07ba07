"""The pretrain stage on real WebDataset shards (shards.reader): exact resume through the shard reader,
the published output, and the Prefect flow behind `lvdflow pretrain`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lvdflow.errors import UserError
from lvdflow.stage import is_complete
from pretrain.metrics_log import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_helpers import tiny_config, toy_images  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from curation.ingest import run_ingest
    from shards.writer import run_shard

    root = tmp_path_factory.mktemp("pool")
    for i, img in enumerate(toy_images(30)):
        img.save(root / f"img_{i:03d}.png")
    run_ingest([root], root.parent / "ingest", workers=0)
    run_shard(root.parent / "ingest", root.parent / "shards", max_count=8)
    return root.parent / "shards"


@pytest.fixture(scope="module")
def eval_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    imgs = toy_images(16, seed=5)
    for split, idx in (("train", range(0, 10)), ("test", range(10, 16))):
        for i in idx:
            d = root / split / ("h" if i % 2 == 0 else "v")
            d.mkdir(parents=True, exist_ok=True)
            imgs[i].save(d / f"{i}.png")
    return root / "train", root / "test"


def _cfg_file(tmp_path, **kw):
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps({k: v for k, v in tiny_config(**kw).to_dict().items()}))
    return p


def test_resume_through_the_shard_reader_is_exact(tmp_path, shards):
    from pretrain.train import train

    cfg = tiny_config(total_iters=6, checkpoint_every=3)
    train(cfg, tmp_path / "a", shards=shards)
    train(tiny_config(total_iters=6, checkpoint_every=3, stop_after=4), tmp_path / "b", shards=shards)
    # stop_after checkpoints at 4; the resumed run continues the reader exactly where it stopped.
    train(cfg, tmp_path / "b", shards=shards)
    key = lambda r: (r["iteration"], r["total_loss"], r["ibot_loss"])  # noqa: E731
    a = [key(r) for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "total_loss" in r]
    b = [key(r) for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "total_loss" in r]
    assert len(a) == 6 and a == b


def test_run_pretrain_publishes_teacher_and_baseline(tmp_path, shards, eval_dirs):
    from pretrain.run_pretrain import run_pretrain

    m = run_pretrain(shards, tmp_path / "out", config=str(_cfg_file(tmp_path, total_iters=3)),
                     eval_train=eval_dirs[0], eval_test=eval_dirs[1])
    out = tmp_path / "out"
    assert is_complete(out) and m["counts"]["iterations"] == 3
    assert set(m["knn"]) == set(m["knn_random_init"]) == {"knn_top1_k10", "knn_top1_k20"}
    for rel in m["outputs"].values():
        assert (out / rel).exists(), rel
    assert m["digest"]


def test_run_pretrain_input_errors(tmp_path, shards):
    from pretrain.run_pretrain import run_pretrain

    with pytest.raises(UserError, match="does not exist"):
        run_pretrain(tmp_path / "none", tmp_path / "o")
    with pytest.raises(UserError, match="both"):
        run_pretrain(shards, tmp_path / "o", eval_train=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="shards"):
        run_pretrain(empty, tmp_path / "o", config=str(_cfg_file(tmp_path)))


@pytest.mark.slow
def test_lvdflow_pretrain_runs_the_flow(tmp_path, shards, prefect_server, capsys):
    from lvdflow.cli import main

    cfg = _cfg_file(tmp_path, total_iters=2)
    assert main(["pretrain", "--config", str(cfg), "--shards", str(shards), "--out", str(tmp_path / "run")]) == 0
    assert is_complete(tmp_path / "run")
    assert (tmp_path / "run" / "teacher" / "teacher_official.pth").is_file()
    assert main(["pretrain", "--config", str(cfg), "--shards", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert main(["pretrain", "--config", str(cfg), "--shards", str(shards), "--out", str(tmp_path / "x"),
                 "--set", "bogus_key=1"]) == 2
