"""kill -9 in the middle of dedup and of shard writing, then a rerun: the same outputs as an uninterrupted
run, nothing lost or doubled. (Ingest, embed and pretraining have theirs in their own test files.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from tests.image_helpers import noise_images

ROOT = Path(__file__).resolve().parents[1]


def _images(folder: Path, n: int, seed: int = 0) -> Path:
    noise_images(folder, n, size=(40, 48), seed=seed)
    base = Image.open(folder / "000.png")
    base.resize((60, 50)).save(folder / "copy_of_000.png")  # something for dedup to find
    base.save(folder / "same_as_000.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


def _start(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()


DEDUP = """
import logging, sys, time
from curation.dedup.stage import run_dedup

class Slow(logging.Handler):  # report each described chunk, then dawdle so the kill lands mid-run
    def emit(self, record):
        msg = record.getMessage()
        if "described" in msg:
            print(msg, flush=True)
            time.sleep(0.5)

logging.getLogger("curation.dedup.stage").addHandler(Slow())
logging.getLogger("curation.dedup.stage").setLevel(logging.INFO)
run_dedup(sys.argv[1], sys.argv[2], chunk=8, threads=1)
"""


def test_killed_dedup_reruns_to_the_same_result(tmp_path):
    from curation.dedup.stage import run_dedup

    src = _images(tmp_path / "src", 40)
    reference = run_dedup(src, tmp_path / "ref", chunk=8, threads=1)
    out = tmp_path / "out"
    proc = _start(DEDUP, str(src), str(out))
    line = proc.stdout.readline()  # the first chunk is described: the run is under way
    _kill(proc)
    assert "described 8/43" in line, line
    assert not out.exists(), "a killed dedup must not publish"
    again = run_dedup(src, out, chunk=8, threads=1)
    assert again["counts"] == reference["counts"] and again["digest"] == reference["digest"]
    assert pq.read_table(out / "dedup.parquet").equals(pq.read_table(tmp_path / "ref" / "dedup.parquet"))
    assert reference["counts"]["removed"] >= 2  # the copy and the exact duplicate


SHARD = """
import sys, time
import shards.writer as w
write = w.write_shard

def slow_write(*args, **kwargs):  # report each finished shard, then dawdle so the kill lands mid-run
    result = write(*args, **kwargs)
    print(result.shard + 1, flush=True)
    time.sleep(0.3)
    return result

w.write_shard = slow_write
w.run_shard(sys.argv[1], sys.argv[2], max_count=4)
"""


def test_killed_shard_writer_resumes_to_byte_identical_shards(tmp_path):
    from curation.ingest import run_ingest
    from shards.writer import run_shard

    src = _images(tmp_path / "src", 40)
    run_ingest([src], tmp_path / "ingest", workers=0)
    reference = run_shard(tmp_path / "ingest", tmp_path / "ref", max_count=4)
    out = tmp_path / "out"
    proc = _start(SHARD, str(tmp_path / "ingest"), str(out))
    while (line := proc.stdout.readline()) and int(line) < 3:
        pass
    _kill(proc)
    work = Path(str(out) + ".partial")
    written = sorted(p.name for p in work.glob("*.tar"))
    assert 3 <= len(written) < reference["counts"]["shards"], written
    assert not out.exists()
    resumed = run_shard(tmp_path / "ingest", out, max_count=4)
    assert resumed["counts"]["shards_skipped"] >= 3  # the shards of the killed run were kept, not redone
    assert {k: v for k, v in resumed["counts"].items() if k != "shards_skipped"} == \
        {k: v for k, v in reference["counts"].items() if k != "shards_skipped"}
    ref_files = sorted(p.name for p in (tmp_path / "ref").iterdir() if p.suffix in (".tar", ".parquet"))
    assert ref_files == sorted(p.name for p in out.iterdir() if p.suffix in (".tar", ".parquet"))
    for name in ref_files:
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert not list(out.glob("*.tmp"))


PRETRAIN = """
import sys, torch
torch.set_num_threads(1)
from pretrain.run_pretrain import run_pretrain
run_pretrain(sys.argv[1], sys.argv[2], config="demo", overrides=__import__("json").loads(sys.argv[3]), baseline=False)
"""


def _train_losses(run: Path) -> list[tuple]:
    from pretrain.metrics_log import read_metrics

    rows = [r for r in read_metrics(run / "metrics.jsonl") if "total_loss" in r]
    return [(r["iteration"], r["total_loss"], r["dino_global_crops_loss"], r["ibot_loss"]) for r in rows]


def test_killed_pretraining_resumes_to_the_same_losses(tmp_path, one_torch_thread):
    import json

    from curation.ingest import run_ingest
    from pretrain.run_pretrain import run_pretrain
    from shards.writer import run_shard

    run_ingest([_images(tmp_path / "src", 40)], tmp_path / "ingest", workers=0)
    run_shard(tmp_path / "ingest", tmp_path / "shards", max_count=10)
    overrides = {"total_iters": 14, "checkpoint_every": 4, "warmup_iters": 2, "warmup_teacher_temp_iters": 2,
                 "freeze_last_layer_iters": 1, "batch_size_per_rank": 4, "eval_every": 0, "num_threads": 1,
                 "log_every": 1}
    full = run_pretrain(tmp_path / "shards", tmp_path / "full", config="demo", overrides=overrides, baseline=False)
    out = tmp_path / "killed"
    metrics = Path(str(out) + ".partial") / "metrics.jsonl"
    proc = _start(PRETRAIN, str(tmp_path / "shards"), str(out), json.dumps(overrides))
    deadline = time.time() + 300
    # Kill once iteration 6 is logged: after the checkpoint at 4, before the one at 8.
    while time.time() < deadline and not (metrics.is_file() and '"iteration": 6' in metrics.read_text()):
        time.sleep(0.05)
    _kill(proc)
    assert not out.exists() and max(r[0] for r in _train_losses(metrics.parent)) < 13, "the kill must land mid-run"
    resumed = run_pretrain(tmp_path / "shards", out, config="demo", overrides=overrides, baseline=False)
    assert resumed["counts"] == full["counts"]
    assert _train_losses(out) == _train_losses(tmp_path / "full")  # exact floats, iterations 0..13 once each
    assert [r[0] for r in _train_losses(out)] == list(range(14))
    assert resumed["digest"] == full["digest"]  # the exported teacher, byte for byte


def test_a_corrupt_training_checkpoint_is_reported_by_name(tmp_path, one_torch_thread):
    import pytest

    from pretrain.checkpointing import CheckpointError
    from pretrain.train import train
    from tests.pretrain_helpers import ListStream, tiny_config, toy_images

    cfg = tiny_config(total_iters=4, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):  # stop after the checkpoint at 2, as a crash would

        class Stop(ListStream):
            def __iter__(self):
                for n, img in enumerate(super().__iter__()):
                    if n == 3 * cfg.batch_size_per_rank:
                        raise KeyboardInterrupt
                    yield img

        train(cfg, tmp_path / "run", dataset=Stop(toy_images(16)))
    ckpt = tmp_path / "run" / "checkpoints" / "it_00000002"
    distcp = sorted(ckpt.glob("*.distcp"))[0]
    distcp.write_bytes(distcp.read_bytes()[:100])  # truncated, as by a full disk
    with pytest.raises(CheckpointError, match="it_00000002"):
        train(cfg, tmp_path / "run", dataset=ListStream(toy_images(16)))
