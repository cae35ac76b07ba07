"""WebDataset shards: writer round trip, limits, atomic resume; reader split, epochs, resume, corruption."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from torch.utils.data import DataLoader

import shards.writer as writer
from _retrieval_data import write_images, write_manifest
from lvdflow.errors import UserError
from lvdflow.stage import is_complete
from shards.reader import CorruptShardError, ShardDataset, emission_order


@pytest.fixture
def manifest(tmp_path):
    table = write_images(tmp_path / "img", 40, np.random.default_rng(0))
    # Retrieval columns, as in retrieved.parquet.
    table = table.append_column("cluster", pa.array([i % 5 for i in range(40)], pa.int64()))
    table = table.append_column("queries", pa.array([[f"q{i}", "q0"] for i in range(40)], pa.list_(pa.string())))
    table = table.append_column("distances", pa.array([[0.1, 0.2]] * 40, pa.list_(pa.float32())))
    return write_manifest(table, tmp_path / "ret" / "retrieved.parquet").parent, table


def _mp(num_workers: int) -> dict:
    # Workers from a fork of this process inherit the threads of the session's Prefect test server
    # client and die at exit (code 1) once it is running; forkserver workers start from a clean process.
    return {"multiprocessing_context": "forkserver"} if num_workers else {}


def _collate(batch):
    return {k: [b[k] for b in batch] for k in batch[0]}


def test_writer_round_trip_keeps_original_bytes(manifest, tmp_path):
    src, table = manifest
    m = writer.run_shard(src, tmp_path / "shards", max_count=7)
    out = tmp_path / "shards"
    assert is_complete(out)
    assert sorted(p.name for p in out.glob("*.tar")) == [f"{i:06d}.tar" for i in range(6)]
    assert m["counts"]["samples"] == 40 and m["counts"]["shards"] == 6
    rows = {r["id"]: r for r in table.to_pylist()}
    seen = 0
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            names = tf.getnames()
            for name in names:
                key, ext = name.split(".", 1)
                data = tf.extractfile(name).read()
                if ext == "json":
                    meta = json.loads(data)
                    assert meta["uri"] == rows[key]["uri"] and meta["cluster"] == rows[key]["cluster"]
                    assert meta["queries"] == [f"q{list(rows).index(key)}", "q0"] and len(meta["distances"]) == 2
                    assert meta["sha256"] == rows[key]["sha256"]
                else:
                    assert ext == {"PNG": "png", "JPEG": "jpg"}[rows[key]["format"]]
                    assert data == Path(rows[key]["source"]).read_bytes()  # not re-encoded
                    seen += 1
        idx = pq.read_table(tar.with_suffix(".parquet"))
        assert idx["key"].to_pylist() == [n.split(".")[0] for n in names if n.endswith(".json")]
    assert seen == 40
    index = pq.read_table(out / "index.parquet")
    assert index.num_rows == 40 and sorted(set(index["shard"].to_pylist())) == list(range(6))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["per_shard"] == [7, 7, 7, 7, 7, 5]


def test_writer_byte_limit_and_errors(manifest, tmp_path):
    src, table = manifest
    rows = table.to_pylist()
    Path(rows[3]["source"]).unlink()  # unreadable
    Path(rows[5]["source"]).write_bytes(b"changed")  # bytes differ from the manifest
    limit = 3 * (max(r["bytes"] for r in rows) + writer.SAMPLE_OVERHEAD)
    m = writer.run_shard(src, tmp_path / "s", max_count=1000, max_bytes=limit)
    out = tmp_path / "s"
    assert m["counts"]["shards"] > 40 // 3 - 1
    for p in out.glob("*.tar"):
        assert p.stat().st_size <= limit + 1024 * 10  # tar end-of-archive blocks come on top of the plan
    assert m["counts"]["samples"] == 38 and m["error_reasons"] == {"unreadable": 1, "changed_since_ingest": 1}
    errs = pq.read_table(out / "errors.parquet").to_pylist()
    assert {e["id"] for e in errs} == {rows[3]["id"], rows[5]["id"]}


def test_rerun_skips_complete_shards(manifest, tmp_path, monkeypatch):
    src, _ = manifest
    out = tmp_path / "s"
    real = writer._read_bytes
    calls = {"n": 0}

    def crashing(row):
        calls["n"] += 1
        if calls["n"] > 17:
            raise KeyboardInterrupt("killed")  # not caught per row: the run dies mid-shard
        return real(row)

    monkeypatch.setattr(writer, "_read_bytes", crashing)
    with pytest.raises(KeyboardInterrupt):
        writer.run_shard(src, out, max_count=7)
    work = Path(str(out) + ".partial")
    done = sorted(p.name for p in work.glob("*.parquet"))
    assert done == ["000000.parquet", "000001.parquet"]  # 14 rows written, shard 2 died after 3
    inode = (work / "000000.tar").stat().st_ino
    counted = {"n": 0}

    def counting(row):
        counted["n"] += 1
        return real(row)

    monkeypatch.setattr(writer, "_read_bytes", counting)
    m = writer.run_shard(src, out, max_count=7)
    assert counted["n"] == 40 - 14 and m["counts"]["shards_skipped"] == 2
    assert (out / "000000.tar").stat().st_ino == inode
    # A rerun over the published output skips every shard; changed limits rewrite them.
    counted["n"] = 0
    m = writer.run_shard(src, out, max_count=7)
    assert counted["n"] == 0 and m["counts"]["shards_skipped"] == 6
    m = writer.run_shard(src, out, max_count=10)
    assert m["counts"]["shards"] == 4 and counted["n"] == 40 and not (out / "000005.tar").exists()


def test_faces_are_blurred_or_refused(tmp_path, monkeypatch):
    table = write_images(tmp_path / "img", 4, np.random.default_rng(1), formats=("PNG", "JPEG"))
    faces = [[[2, 2, 10, 10]], [], None, [[0, 0, 5, 5], [6, 6, 14, 12]]]  # [x, y, w, h], as the detector writes
    table = table.append_column("faces", pa.array(faces, pa.list_(pa.list_(pa.int64()))))
    write_manifest(table, tmp_path / "m" / "manifest.parquet")
    real_hook = writer._blur_hook
    monkeypatch.setattr(writer, "_blur_hook", lambda: None)
    with pytest.raises(UserError, match="unblurred faces"):
        writer.run_shard(tmp_path / "m", tmp_path / "s")
    monkeypatch.setattr(writer, "_blur_hook", real_hook)  # curation.faces.blur_boxes
    m = writer.run_shard(tmp_path / "m", tmp_path / "s")
    assert m["counts"]["blurred"] == 2
    ds = ShardDataset(tmp_path / "s", decode="bytes", shuffle_buffer=1, with_meta=True)
    got = {s["key"]: s for s in ds}
    assert not ds.errors  # the stored sha256 is that of the blurred bytes
    for r, f in zip(table.to_pylist(), faces):
        s = got[r["id"]]
        original = Path(r["source"]).read_bytes()
        assert s["meta"]["blurred"] == bool(f)
        assert (s["image"] == original) == (not f)
        assert s["meta"]["ext"] == {"PNG": "png", "JPEG": "jpg"}[r["format"]]  # same format after blurring
        if f and r["format"] == "PNG":  # lossless: only the face region changed
            a = np.asarray(Image.open(io.BytesIO(s["image"])).convert("RGB"), dtype=int)
            b = np.asarray(Image.open(io.BytesIO(original)).convert("RGB"), dtype=int)
            x, y, w, h = f[0]
            changed = np.argwhere((a != b).any(axis=2))
            assert len(changed) > 0
            assert changed[:, 1].max() < x + w + 3 and changed[:, 0].max() < y + h + 3


@pytest.fixture
def shard_dir(manifest, tmp_path):
    src, table = manifest
    writer.run_shard(src, tmp_path / "ds", max_count=5, shuffle_seed=None)  # 8 shards of 5, in manifest order
    return tmp_path / "ds", table


def test_rows_are_written_in_a_seeded_permutation_by_default(manifest, tmp_path):
    # Inputs come grouped (folders walked in order): the shards must not keep that order by default.
    src, table = manifest
    ids = table["id"].to_pylist()
    keys = {}
    for name, kw in {"a": {}, "b": {}, "seed1": {"shuffle_seed": 1}, "kept": {"shuffle_seed": None}}.items():
        m = writer.run_shard(src, tmp_path / name, max_count=7, **kw)
        keys[name] = pq.read_table(tmp_path / name / "index.parquet")["key"].to_pylist()
        assert m["params"]["shuffle_seed"] == kw.get("shuffle_seed", 0)
    assert sorted(keys["a"]) == sorted(ids) and keys["a"] != ids
    assert keys["a"] == keys["b"] and keys["seed1"] != keys["a"]  # deterministic, and the seed matters
    assert keys["kept"] == ids


def test_reader_decodes_and_verifies(shard_dir):
    root, table = shard_dir
    ds = ShardDataset(root, shuffle_buffer=1, shuffle_shards=False)
    samples = list(ds)
    assert [s["key"] for s in samples] == table["id"].to_pylist()  # no shuffle: manifest order
    src = Image.open(table["source"][0].as_py()).convert("RGB")
    assert np.array_equal(np.asarray(samples[0]["image"]), np.asarray(src))


@pytest.mark.parametrize("world_size,num_workers", [(1, 2), (2, 2), (3, 1), (3, 2)])
def test_rank_and_worker_split_covers_every_sample_once(shard_dir, world_size, num_workers):
    root, table = shard_dir
    keys = []
    for rank in range(world_size):
        ds = ShardDataset(root, rank=rank, world_size=world_size, seed=7, shuffle_buffer=4, decode="bytes")
        ds.set_epoch(3)
        got = [k for b in DataLoader(ds, batch_size=3, num_workers=num_workers, collate_fn=_collate, **_mp(num_workers)) for k in b["key"]]
        assert len(got) == ds.samples_per_rank(3)[rank] == 40 // world_size  # 3 ranks: 13 each, from shard slices
        keys += got
    assert len(keys) == len(set(keys))
    assert set(keys) <= set(table["id"].to_pylist()) and len(keys) == table.num_rows - table.num_rows % world_size


def _write_shards(root: Path, sizes: list[int]) -> list[str]:
    """Shards of the given sample counts, as the shard writer lays them out (tar + parquet index); the keys."""
    import hashlib

    from webdataset import TarWriter

    root.mkdir(parents=True, exist_ok=True)
    keys = []
    for s, n in enumerate(sizes):
        rows = []
        with open(root / f"{s:06d}.tar", "wb") as f:
            tw = TarWriter(f, encoder=False)
            for i in range(n):
                b = io.BytesIO()
                Image.new("RGB", (8, 8), (s * 40, i * 7, 0)).save(b, "PNG")
                key = f"s{s}k{i:03d}"
                tw.write({"__key__": key, "png": b.getvalue(),
                          "json": json.dumps({"ext": "png", "sha256": hashlib.sha256(b.getvalue()).hexdigest()}).encode()})
                rows.append({"key": key})
            tw.close()
        pq.write_table(pa.Table.from_pylist(rows), root / f"{s:06d}.parquet")
        keys += [r["key"] for r in rows]
    return keys


def _read(ds: ShardDataset, workers: int, monkeypatch) -> list[list[str]]:
    """Each DataLoader worker's keys, the workers run one after the other in this process."""
    import shards.reader as reader

    out = []
    for w in range(workers):
        monkeypatch.setattr(reader, "get_worker_info", lambda w=w: SimpleNamespace(id=w, num_workers=workers))
        out.append([s["key"] for s in ds])
    return out


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_one_shard_is_split_between_two_ranks(tmp_path, drop_remainder):
    keys = _write_shards(tmp_path / "s", [7])
    for epoch in range(3):
        got = []
        for rank in range(2):
            ds = ShardDataset(tmp_path / "s", rank=rank, world_size=2, seed=0, shuffle_buffer=3, decode="bytes",
                              drop_remainder=drop_remainder)
            ds.set_epoch(epoch)
            got.append([s["key"] for s in ds])
        assert [len(g) for g in got] == ([3, 3] if drop_remainder else [3, 4])
        assert len(set(got[0] + got[1])) == sum(map(len, got))  # disjoint
        if not drop_remainder:
            assert sorted(got[0] + got[1]) == sorted(keys)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("drop_remainder", [True, False])
def test_unequal_shards_are_split_evenly_by_sample(tmp_path, monkeypatch, world_size, drop_remainder):
    keys = _write_shards(tmp_path / "s", [5, 11, 3])  # 19 samples
    dropped = []
    for epoch in range(3):
        per_rank = []
        for rank in range(world_size):
            ds = ShardDataset(tmp_path / "s", rank=rank, world_size=world_size, seed=1, shuffle_buffer=4,
                              decode="bytes", drop_remainder=drop_remainder)
            ds.set_epoch(epoch)
            workers = _read(ds, 2, monkeypatch)
            per_rank.append(workers[0] + workers[1])
            assert len(per_rank[-1]) == len(ds) == ds.samples_per_rank(epoch)[rank]
        counts = [len(k) for k in per_rank]
        everything = [k for r in per_rank for k in r]
        assert len(everything) == len(set(everything))  # no sample twice, across ranks and workers
        if drop_remainder:
            assert set(counts) == {19 // world_size}
            assert len(set(keys) - set(everything)) == 19 % world_size
            dropped.append(set(keys) - set(everything))
        else:
            assert max(counts) - min(counts) <= 1
            assert sorted(everything) == sorted(keys)
    if drop_remainder:
        assert len(set.union(*dropped)) > 19 % world_size  # each epoch drops other samples


def test_fewer_samples_than_ranks_is_a_clear_user_error(tmp_path):
    _write_shards(tmp_path / "s", [3])
    with pytest.raises(UserError, match=r"3 samples.*world size of 4.*max_count"):
        ShardDataset(tmp_path / "s", rank=0, world_size=4)
    for rank in range(3):  # as many samples as ranks: one each
        assert len(list(ShardDataset(tmp_path / "s", rank=rank, world_size=3, decode="bytes"))) == 1


def test_resume_inside_a_shard_slice_is_exact(tmp_path):
    _write_shards(tmp_path / "s", [5, 11, 3])

    def make():
        ds = ShardDataset(tmp_path / "s", rank=1, world_size=2, seed=1, shuffle_buffer=4, decode="bytes")
        ds.set_epoch(2)
        return ds

    ds = make()
    assert any(hi - lo < len(ds.keys[s]) for s, lo, hi in ds.rank_pieces(2))  # a slice of a shard
    full = [s["key"] for s in ds]
    assert len(full) == 9
    for stop in (1, 4, 8):
        ds = make()
        it = iter(ds)
        for _ in range(stop):
            ds.record(next(it))
        state = json.loads(json.dumps(ds.state_dict()))
        resumed = make()
        resumed.load_state_dict(state)
        assert full[:stop] + [s["key"] for s in resumed] == full


def test_positions_saved_before_the_sample_split(tmp_path):
    _write_shards(tmp_path / "s", [5, 11, 3])
    old = {"epoch": 2, "seed": 1, "rank": 0, "world_size": 1, "num_workers": 1, "shuffle_buffer": 4, "shards": 3,
           "consumed": {0: 6}}  # a position as the whole-shard split saved it

    def one(**kw):
        ds = ShardDataset(tmp_path / "s", seed=1, shuffle_buffer=4, decode="bytes", **kw)
        ds.set_epoch(2)
        return ds

    full = [s["key"] for s in one()]
    ds = one()
    ds.load_state_dict(old)  # one rank: the same plan as before, the position resumes exactly
    assert [s["key"] for s in ds] == full[6:]
    ds = one(rank=1, world_size=2)
    ds.load_state_dict({**old, "rank": 1, "world_size": 2})  # shards were dealt whole: start the next epoch
    assert ds.epoch == 3 and len(list(ds)) == 9
    with pytest.raises(ValueError, match="drop_remainder"):
        one().load_state_dict({**one(drop_remainder=False).state_dict()})


def test_epochs_are_deterministic_and_differ(shard_dir):
    root, _ = shard_dir

    def order(epoch, seed=0):
        ds = ShardDataset(root, seed=seed, shuffle_buffer=10, decode="bytes")
        ds.set_epoch(epoch)
        return [s["key"] for s in ds]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert order(1) != order(1, seed=5)
    assert sorted(order(0)) == sorted(order(1))


def test_emission_order_is_a_bounded_buffer_permutation():
    o = emission_order(1000, 16, np.random.default_rng(0))
    assert sorted(o.tolist()) == list(range(1000))
    # A buffer of 16 never emits an input more than 15 positions before it was read.
    assert all(o[k] <= k + 15 for k in range(1000))


def test_resume_position_is_exact(shard_dir):
    root, table = shard_dir

    def make():
        ds = ShardDataset(root, seed=1, shuffle_buffer=8, decode="bytes")
        ds.set_epoch(2)
        return ds

    def run(ds, stop=None):
        per_worker: dict[int, list[str]] = {}
        for n, b in enumerate(DataLoader(ds, batch_size=3, num_workers=2, collate_fn=_collate, **_mp(2))):
            if stop is not None and n == stop:
                break
            for w, k in zip(b["worker"], b["key"]):
                per_worker.setdefault(w, []).append(k)
            ds.record(b)
        return per_worker

    full = run(make())
    ds = make()
    first = run(ds, stop=5)
    state = ds.state_dict()
    assert state["epoch"] == 2 and state["num_workers"] == 2 and sum(state["consumed"].values()) == 15
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    rest = run(resumed)
    for w in full:
        assert first.get(w, []) + rest.get(w, []) == full[w]  # each worker's stream continues exactly
    assert sum(len(v) for v in first.values()) + sum(len(v) for v in rest.values()) == table.num_rows
    with pytest.raises(ValueError, match="dataloader workers"):
        bad = make()
        bad.load_state_dict(state)
        next(iter(DataLoader(bad, batch_size=3, num_workers=1, collate_fn=_collate, **_mp(1))))


def test_corrupt_shard_is_named_and_skipped_or_raised(shard_dir, tmp_path):
    root, table = shard_dir
    tar = root / "000003.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 3])  # truncated
    log = tmp_path / "errors.jsonl"
    ds = ShardDataset(root, shuffle_buffer=4, decode="bytes", error_log=log)
    keys = [s["key"] for s in ds]
    shard3 = set(pq.read_table(root / "000003.parquet")["key"].to_pylist())
    assert set(keys) >= set(table["id"].to_pylist()) - shard3 and len(keys) < table.num_rows
    assert ds.errors and all(e["shard"] == "000003.tar" for e in ds.errors)
    assert "000003.tar" in log.read_text()
    with pytest.raises(CorruptShardError, match="000003.tar"):
        list(ShardDataset(root, shuffle_buffer=4, decode="bytes", on_error="raise"))


def test_checksum_mismatch_names_shard_and_sample(shard_dir):
    root, _ = shard_dir
    tar = root / "000001.tar"
    with tarfile.open(tar) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    victim = next(m for m, _ in members if not m.name.endswith(".json"))
    with tarfile.open(tar, "w") as tf:  # rewrite with one image's bytes altered
        for m, d in members:
            if m.name == victim.name:
                d = bytes([d[0] ^ 0xFF]) + d[1:]
            tf.addfile(m, io.BytesIO(d))
    ds = ShardDataset(root, shuffle_buffer=1, decode="bytes")
    keys = [s["key"] for s in ds]
    assert len(keys) == 39 and victim.name.split(".")[0] not in keys
    assert ds.errors[0]["shard"] == "000001.tar" and ds.errors[0]["key"] == victim.name.split(".")[0]
    assert "sha256" in ds.errors[0]["reason"]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_retrieve_and_shard_flows_cache_and_chain(tmp_path):
    """retrieve -> shard under Prefect: outputs chain, a rerun is a cache hit, the reader streams the result."""
    from _retrieval_data import blob_vectors, write_embeddings
    from flows.retrieve import retrieve_flow
    from flows.shard import shard_flow
    from tests.prefect_helpers import task_states

    rng = np.random.default_rng(5)
    table = write_images(tmp_path / "img", 60, rng)
    write_manifest(table, tmp_path / "ingest" / "manifest.parquet")
    centers = np.eye(16)[:2]
    vecs, blob = blob_vectors(rng, centers, [30, 30])
    write_embeddings(tmp_path / "pool", table["id"].to_pylist(), vecs)
    q, _ = blob_vectors(rng, centers, [0, 6])
    write_embeddings(tmp_path / "qset", [f"q{i}" for i in range(6)], q)

    def run(flow, **kw):
        state = flow(return_state=True, **kw)
        assert state.is_completed(), state
        return state.result(), task_states(state.state_details.flow_run_id)

    kw = dict(pool_embeddings=str(tmp_path / "pool"), query_embeddings=[str(tmp_path / "qset")],
              pool_manifest=str(tmp_path / "ingest"), out=str(tmp_path / "ret"), params={"n_clusters": 2})
    r1, s1 = run(retrieve_flow, **kw)
    assert s1["retrieve"] == "Completed" and r1["counts"]["retrieved"] == 30
    _, s2 = run(retrieve_flow, **kw)
    assert s2["retrieve"] == "Cached"
    m1, t1 = run(shard_flow, source=r1["dir"], out=str(tmp_path / "wds"), max_count=8)
    assert t1["shard"] == "Completed" and m1["counts"]["samples"] == 30 and m1["counts"]["shards"] == 4
    _, t2 = run(shard_flow, source=r1["dir"], out=str(tmp_path / "wds"), max_count=8)
    assert t2["shard"] == "Cached"
    keys = {s["key"] for s in ShardDataset(tmp_path / "wds", decode="bytes")}
    ids = table["id"].to_pylist()
    assert {blob[ids.index(k)] for k in keys} == {1} and len(keys) == 30


def test_empty_input_publishes_no_shards(manifest, tmp_path):
    _, table = manifest
    write_manifest(table.slice(0, 0), tmp_path / "e" / "retrieved.parquet")
    m = writer.run_shard(tmp_path / "e", tmp_path / "s")
    assert m["counts"]["samples"] == 0 and m["counts"]["shards"] == 0 and not list((tmp_path / "s").glob("*.tar"))
    assert pq.read_table(tmp_path / "s" / "index.parquet").num_rows == 0
    with pytest.raises(FileNotFoundError, match="no shards"):
        ShardDataset(tmp_path / "s")


def test_several_inputs_are_sharded_together_and_a_repeated_row_once(manifest, tmp_path):
    # The bootstrap embedder trains on every curated query set: their ingest outputs, concatenated.
    _, table = manifest
    a = write_manifest(table.slice(0, 25), tmp_path / "set_a" / "manifest.parquet").parent
    b = write_manifest(table.slice(20, 20), tmp_path / "set_b" / "manifest.parquet").parent  # rows 20-24 in both
    inline = writer.run_shard([a, b], tmp_path / "inline", max_count=8)
    assert inline["counts"]["inputs"] == 40 and inline["counts"]["repeated_inputs"] == 5
    index = pq.read_table(tmp_path / "inline" / "index.parquet")
    assert sorted(index["key"].to_pylist()) == sorted(table["id"].to_pylist())
    # Units run elsewhere read the same inputs back themselves.
    units = writer.run_shard([str(a), str(b)], tmp_path / "units", max_count=8,
                             map_units=lambda fn, shards: [fn(s) for s in shards])
    assert units["digest"] == inline["digest"]
    with pytest.raises(UserError, match="no input tables"):
        writer.run_shard([], tmp_path / "none")
