"""Curation stages split into units that run as Prefect tasks on a Dask cluster (and on threads and
processes), with outputs identical to the single-process run."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.config import RunnerConfig
from tests.prefect_helpers import run_flow

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture(scope="module")
def dask_address(prefect_server):
    """A local Dask cluster of 2 worker processes that report to the test's Prefect server."""
    from distributed import LocalCluster

    from flows.runners import _worker_env

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      env=_worker_env()) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """Images of several sizes and formats, some broken, a duplicate listing, and a tar shard."""
    root = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)
    folder = root / "folder"
    folder.mkdir()
    for i in range(40):
        size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
        img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        img.save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    Image.new("RGB", (8, 8)).save(folder / "tiny.png")
    with tarfile.open(root / "shard.tar", "w") as tar:
        for i in range(15):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    return root


def _tables_equal(a: Path, b: Path) -> None:
    ta, tb = pq.read_table(a), pq.read_table(b)
    assert ta.num_rows == tb.num_rows
    assert ta.equals(tb), f"{a} != {b}"


def _n_parts(states: dict, name: str) -> int:
    got = states.get(name, [])
    got = [got] if isinstance(got, str) else got
    assert all(s == "Completed" for s in got), got
    return len(got)


def test_ingest_on_dask_equals_the_single_process_run(pool, dask_address, tmp_path):
    from curation.ingest import run_ingest
    from flows.ingest import ingest_flow

    listing = tmp_path / "again.csv"  # lists a file the folder holds too: a duplicate entry
    listing.write_text(f"path\n{pool / 'folder' / '000.jpg'}\n")
    sources = [str(pool / "folder"), str(pool / "shard.tar"), str(listing)]
    ref = run_ingest(sources, tmp_path / "inline", workers=0, batch_size=8)
    got, states = run_flow(ingest_flow, sources=sources, out=str(tmp_path / "dask"), batch_size=8,
                          runner=RunnerConfig(kind="dask", address=dask_address))
    assert _n_parts(states, "ingest-part") == -(-ref["counts"]["inputs"] // 8) >= 7
    assert got["counts"] == ref["counts"] and got["quarantine_reasons"] == ref["quarantine_reasons"]
    assert {"too-small", "duplicate-entry"} <= set(ref["quarantine_reasons"]) and len(ref["quarantine_reasons"]) >= 3
    for name in ("manifest.parquet", "quarantine.parquet"):
        _tables_equal(tmp_path / "inline" / name, tmp_path / "dask" / name)


@pytest.fixture(scope="module")
def manifest(pool, tmp_path_factory) -> Path:
    from curation.ingest import run_ingest

    out = tmp_path_factory.mktemp("ingested") / "ingest"
    run_ingest([str(pool / "folder"), str(pool / "shard.tar")], out, workers=0)
    return out


def test_embed_on_dask_equals_the_single_process_run(manifest, dask_address, tmp_path, one_torch_thread):
    from curation.embed import run_embed
    from curation.embedding_store import load_embeddings
    from flows.embed import embed_flow

    kw = dict(arch="vit_small", patch_size=8, img_size=32, num_heads=6, allow_random_init=True, batch_size=8,
              num_workers=0, device="cpu", shard_size=16)
    ref = run_embed(manifest, None, tmp_path / "inline", **kw)
    got, states = run_flow(embed_flow, manifest=str(manifest), weights=None, out=str(tmp_path / "dask"),
                          runner=RunnerConfig(kind="dask", address=dask_address), **kw)
    assert _n_parts(states, "embed-part") == ref["counts"]["shards"] >= 3
    assert got["counts"] == ref["counts"]
    ids_a, vec_a = load_embeddings(tmp_path / "inline")
    ids_b, vec_b = load_embeddings(tmp_path / "dask")
    assert list(ids_a) == list(ids_b) and len(ids_a) == ref["counts"]["embedded"]
    np.testing.assert_array_equal(vec_a, vec_b)


@pytest.mark.parametrize("kind", ["dask-local", "threads", "processes"])
def test_shard_on_task_runners_equals_the_single_process_run(manifest, tmp_path, kind):
    from flows.shard import shard_flow
    from shards.writer import run_shard

    ref = run_shard(manifest, tmp_path / "inline", max_count=10)
    # "dask-local": the runner starts (and stops) its own LocalCluster of 2 processes.
    runner = RunnerConfig(kind="dask" if kind == "dask-local" else kind, workers=2)
    got, states = run_flow(shard_flow, source=str(manifest), out=str(tmp_path / kind), max_count=10, runner=runner)
    assert _n_parts(states, "shard-part") == ref["counts"]["shards"] >= 5
    assert got["counts"] == ref["counts"]
    tars = sorted(p.name for p in (tmp_path / "inline").glob("*.tar"))
    assert tars == sorted(p.name for p in (tmp_path / kind).glob("*.tar"))
    for name in tars:
        assert (tmp_path / "inline" / name).read_bytes() == (tmp_path / kind / name).read_bytes(), name
    _tables_equal(tmp_path / "inline" / "index.parquet", tmp_path / kind / "index.parquet")


def test_shard_on_ray_equals_the_single_process_run(manifest, tmp_path):
    pytest.importorskip("prefect_ray", reason="the optional 'ray' extra is not installed")
    from flows.shard import shard_flow
    from shards.writer import run_shard

    ref = run_shard(manifest, tmp_path / "inline", max_count=10)
    got, states = run_flow(shard_flow, source=str(manifest), out=str(tmp_path / "ray"), max_count=10,
                          runner=RunnerConfig(kind="ray", workers=2))
    assert _n_parts(states, "shard-part") == ref["counts"]["shards"]
    for p in sorted((tmp_path / "inline").glob("*.tar")):
        assert p.read_bytes() == (tmp_path / "ray" / p.name).read_bytes(), p.name


def test_dedup_on_dask_equals_the_single_process_run(pool, dask_address, tmp_path):
    from curation.dedup.stage import run_dedup
    from flows.dedup import dedup_flow

    folder = tmp_path / "images"
    folder.mkdir()
    photo = Image.open(pool / "folder" / "001.png").resize((120, 90))
    photo.save(folder / "a.png")
    photo.resize((90, 68)).save(folder / "a_small.png")  # a copy
    photo.save(folder / "a_again.png")  # an exact duplicate
    for p in sorted((pool / "folder").glob("*"))[:30]:
        (folder / p.name).write_bytes(p.read_bytes())
    params = {"chunk": 8, "threshold": 0.6}
    ref = run_dedup(folder, tmp_path / "inline", **params)
    got, states = run_flow(dedup_flow, input=str(folder), out=str(tmp_path / "dask"), params=params,
                          runner=RunnerConfig(kind="dask", address=dask_address))
    assert _n_parts(states, "dedup-part") == -(-33 // 8)
    assert got["counts"] == ref["counts"] and ref["counts"]["removed"] >= 1
    _tables_equal(tmp_path / "inline" / "dedup.parquet", tmp_path / "dask" / "dedup.parquet")


def test_retrieve_on_dask_equals_the_single_process_run(dask_address, tmp_path):
    from curation.retrieve import run_retrieve
    from flows.retrieve import retrieve_flow
    from tests._retrieval_data import blob_vectors, write_embeddings, write_images, write_manifest

    rng = np.random.default_rng(4)
    table = write_images(tmp_path / "images", 300, rng)
    centers = np.linalg.qr(rng.normal(size=(32, 32)))[0][:3]
    vecs, _ = blob_vectors(rng, centers, [150, 100, 50])
    write_embeddings(tmp_path / "pool_emb", table["id"].to_pylist(), vecs, shard_size=100)
    write_manifest(table, tmp_path / "ingest" / "manifest.parquet")
    queries, _ = blob_vectors(rng, centers, [10, 20, 6])
    write_embeddings(tmp_path / "q", [f"q{i}" for i in range(36)], queries)
    args = (str(tmp_path / "pool_emb"), [str(tmp_path / "q")], str(tmp_path / "ingest" / "manifest.parquet"))
    params = {"mode": "sample", "k": 5, "n_clusters": 3, "query_chunk": 8, "search_batch": 4, "report": False}
    ref = run_retrieve(*args, tmp_path / "inline", **params)
    got, states = run_flow(retrieve_flow, pool_embeddings=args[0], query_embeddings=args[1], pool_manifest=args[2],
                          out=str(tmp_path / "dask"), params=params,
                          runner=RunnerConfig(kind="dask", address=dask_address))
    assert _n_parts(states, "retrieve-part") == 36 // 8 + 1
    assert got["counts"] == ref["counts"] and ref["counts"]["collisions"] > 0
    _tables_equal(tmp_path / "inline" / "retrieved.parquet", tmp_path / "dask" / "retrieved.parquet")
    assert not (tmp_path / "dask" / "pool.faiss").exists()  # scratch removed


def test_dask_workers_report_to_an_ephemeral_server(manifest, tmp_path):
    """Without a server, the flow runs on an ephemeral one; local workers must report there instead of
    starting temporary servers of their own. One worker shows it (a second would only add an interpreter
    importing Prefect)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    proc = subprocess.run([sys.executable, "-m", "lvdflow.cli", "shard", str(manifest), "--out", str(tmp_path / "s"),
                           "--max-count", "20", "--runner", "dask", "--runner-workers", "1"],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert out.count("Starting temporary server") == 1, out[-3000:]
    assert len(list((tmp_path / "s").glob("*.tar"))) == 3
