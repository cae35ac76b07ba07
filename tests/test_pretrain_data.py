"""Batches made by worker processes: the same tensors and stream positions as made in the training process."""

from __future__ import annotations

import pytest
import torch

from lvdflow.errors import UserError
from pretrain.data import BatchStream
from pretrain.train import build_augmentation
from pretrain_helpers import ListStream, tiny_config, toy_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _stream(workers: int, images=None) -> BatchStream:
    # 10 images, batches of 4: epochs end inside batches, so the read-ahead crosses epoch boundaries.
    return BatchStream(ListStream(images or toy_images(10)), batch_size=4, seed=3, rank=0, workers=workers, prefetch=2)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_worker_batches_and_positions_equal_the_inline_ones_across_a_crop_size_change():
    cfg = tiny_config(highres_iters=2, highres_global_crops_size=24, highres_local_crops_size=12)
    augs = {False: build_augmentation(cfg), True: build_augmentation(cfg, highres=True)}
    inline, pooled = _stream(0), _stream(2)
    try:
        for it in range(6):
            aug = augs[it >= 4]  # the high-resolution phase: batches read ahead are remade with the new crops
            a, b = inline.next_batch(it, aug, cfg.patch_size), pooled.next_batch(it, aug, cfg.patch_size)
            assert _equal(a, b), f"iteration {it}"
            assert pooled.state_dict() == inline.state_dict(), f"iteration {it}"
        assert b["global_crops"].shape[-1] == 24
        assert pooled.dataset.state_dict() != pooled.state_dict()  # it did read ahead
        assert len(pooled._jobs) == 2 * 2  # prefetch 2 per worker: every worker has a batch to make
    finally:
        pooled.close()


def test_resume_from_a_read_ahead_stream_continues_exactly():
    cfg = tiny_config()
    aug = build_augmentation(cfg)
    first = _stream(2)
    try:
        for it in range(3):
            first.next_batch(it, aug, cfg.patch_size)
        saved = first.state_dict()
    finally:
        first.close()
    reference = _stream(0)
    for it in range(3):
        reference.next_batch(it, aug, cfg.patch_size)
    assert saved == reference.state_dict()
    resumed = _stream(2)
    resumed.load_state_dict(saved)
    try:
        for it in range(3, 6):
            assert _equal(resumed.next_batch(it, aug, cfg.patch_size), reference.next_batch(it, aug, cfg.patch_size))
        # Asked for another iteration than the next (a loop that restarted): the read-ahead is dropped and
        # the stream rewound to the last batch handed out.
        again = resumed.next_batch(10, aug, cfg.patch_size)
        assert _equal(again, reference.next_batch(10, aug, cfg.patch_size))
        resumed.close()  # read ahead, then closed: the next batch is still the next one
        assert resumed._pool is None and resumed.state_dict() == reference.state_dict()
        assert _equal(resumed.next_batch(11, aug, cfg.patch_size), reference.next_batch(11, aug, cfg.patch_size))
    finally:
        resumed.close()
    assert resumed._pool is None


def test_an_unreadable_sample_in_a_worker_is_a_user_error():
    cfg = tiny_config()
    stream = _stream(1, images=[b"not an image"] * 8)
    try:
        with pytest.raises(UserError):
            stream.next_batch(0, build_augmentation(cfg), cfg.patch_size)
    finally:
        stream.close()


def test_data_workers_setting(monkeypatch):
    import lvdflow.parts
    from pretrain.data import data_workers

    assert data_workers(3) == 3
    if not torch.cuda.is_available():
        assert data_workers(-1) == 0  # on CPU the model's threads use the cores
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    full = data_workers(-1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert 1 <= data_workers(-1) <= max(1, full)  # two local ranks share the CPUs
    monkeypatch.setattr(lvdflow.parts, "in_daemon_process", lambda: True)  # e.g. inside a Dask worker
    assert data_workers(-1) == 0 and data_workers(3) == 0


def _one_shard(root, n: int) -> list[str]:
    """One shard of n tiny PNGs, laid out as shards.writer writes them (tar + parquet index)."""
    import hashlib
    import io
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from webdataset import TarWriter

    root.mkdir(parents=True)
    keys = []
    with open(root / "000000.tar", "wb") as f:
        tw = TarWriter(f, encoder=False)
        for i in range(n):
            b = io.BytesIO()
            Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(b, "PNG")
            keys.append(f"k{i:03d}")
            tw.write({"__key__": keys[-1], "png": b.getvalue(),
                      "json": json.dumps({"ext": "png", "sha256": hashlib.sha256(b.getvalue()).hexdigest()}).encode()})
        tw.close()
    pq.write_table(pa.table({"key": keys}), root / "000000.parquet")
    return keys


def test_two_ranks_train_from_one_shard_in_step(tmp_path):
    """The reader splits by sample: one shard feeds two ranks, equal epochs, disjoint within each epoch."""
    from pretrain.data import ShardStream
    from shards.reader import ShardDataset

    _one_shard(tmp_path / "s", 7)
    streams = [ShardStream(ShardDataset(tmp_path / "s", rank=r, world_size=2, seed=0, decode="bytes"))
               for r in range(2)]
    for epoch in range(3):
        got = [list(stream) for stream in streams]
        assert [len(g) for g in got] == [3, 3]  # 7 // 2 each; the one left over is dropped this epoch
        assert not set(got[0]) & set(got[1])
        assert [s.dataset.epoch for s in streams] == [epoch + 1, epoch + 1]  # the ranks' epochs stay in step
    batches = BatchStream(streams[1], batch_size=4, seed=0, rank=1)  # batches across epoch ends: no UserError
    assert len([batches._next_sample() for _ in range(10)]) == 10


def test_positions_of_the_whole_shard_split_resume_every_rank_after_rank_0s_epoch(monkeypatch, tmp_path):
    # Ranks of the earlier whole-shard split ran their own epochs; resumed, they must start one epoch together.
    import pretrain.loop as loop

    class Stream:
        loaded = after = None

        def load_state_dict(self, state):
            self.loaded = state

        def start_after_epoch(self, epoch):
            self.after = epoch

    def resume_rank(saved: dict, world: int) -> Stream:
        info = {"iteration": 7, "data": saved, "data_rank0": {"epoch": 4}, "saved_world_size": world}
        monkeypatch.setattr(loop, "latest_checkpoint", lambda root: tmp_path)
        monkeypatch.setattr(loop, "load_checkpoint", lambda ckpt, model, opt: info)
        monkeypatch.setattr(loop, "world_size", lambda: world)
        stream = Stream()
        assert loop.resume(tmp_path, None, None, stream) == 7
        return stream

    old = {"epoch": 6, "consumed": {"0": 3}}  # this rank had run ahead of rank 0
    s = resume_rank(old, 2)
    assert s.loaded is None and s.after == 4
    s = resume_rank(old, 1)  # one rank: the old and new plans are the same, the position resumes exactly
    assert s.loaded == old and s.after is None
    new = {**old, "split": "samples"}
    assert resume_rank(new, 2).loaded == new
