"""Embedding stage: output layout and values, resumption after SIGKILL, bad files, CLI and flow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from curation import embedding_store as store
from curation.embed import run_embed
from curation.embed_data import IMAGENET_MEAN, IMAGENET_STD, ManifestImages, eval_transform_uint8
from curation.ingest import run_ingest
from lvdflow.errors import UserError
from pretrain.models import build_vit, save_backbone

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(embed_dim=64, depth=2, num_heads=2, patch_size=16, img_size=32)


def normalise_batch():
    """The reference normalisation: torchvision's v2 transforms (the stage's DeviceTransform must match)."""
    from torchvision.transforms import v2

    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _pool(tmp: Path, n: int, tar_n: int = 0) -> Path:
    """An ingested pool of n PNG files (+ tar_n JPEGs in a tar shard) of varied sizes."""
    rng = np.random.default_rng(0)
    src = tmp / "src"
    src.mkdir()
    for i in range(n):
        h, w = int(rng.integers(20, 70)), int(rng.integers(20, 70))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(src / f"{i:03d}.png")
    if tar_n:
        with tarfile.open(tmp / "shard.tar", "w") as tf:
            for i in range(tar_n):
                p = tmp / f"t{i}.jpg"
                Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(p)
                tf.add(p, arcname=f"t{i}.jpg")
    run_ingest([src] + ([tmp / "shard.tar"] if tar_n else []), tmp / "ingest", workers=0)
    return tmp / "ingest"


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(3)
    return save_backbone(build_vit("vit_tiny", **TINY), tmp_path / "tiny.pt")


def test_embeddings_match_the_model_and_cover_the_manifest(tmp_path, weights):
    ingest = _pool(tmp_path, 9, tar_n=3)
    seen = []
    m = run_embed(ingest, weights, tmp_path / "emb", img_size=32, batch_size=4, num_workers=1, device="cpu",
                  shard_size=5, progress=lambda d, t: seen.append((d, t)))  # fmt: skip
    rows = pq.read_table(ingest / "manifest.parquet").to_pylist()
    assert m["counts"] == {"images": 12, "embedded": 12, "failed": 0, "shards": 3} and m["dim"] == 64
    assert seen[-1] == (12, 12) and len(seen) >= 3
    index = store.read_index(tmp_path / "emb").to_pylist()
    assert [r["id"] for r in index] == [r["id"] for r in rows]  # manifest order, nothing missing or twice
    assert [(r["shard"], r["row"]) for r in index][:6] == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0)]
    ids, vecs = store.load_embeddings(tmp_path / "emb")
    assert vecs.shape == (12, 64) and np.load(store.shard_path(tmp_path / "emb", 0)).dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=2e-3)
    # Independent recomputation for a tar member and a plain file: decode, eval transform, CLS, normalise.
    from curation.decode import decode_rgb, read_record_bytes
    from pretrain.models import load_backbone

    model = load_backbone(weights)
    for r in (rows[0], next(r for r in rows if r["member"])):
        x = normalise_batch()(eval_transform_uint8(32)(decode_rgb(read_record_bytes(r)))[None])
        with torch.no_grad():
            ref = torch.nn.functional.normalize(model(x), dim=-1)[0].numpy()
        np.testing.assert_allclose(vecs[ids.index(r["id"])], ref, atol=2e-3)


def test_eval_transform_resizes_short_side_and_crops():
    import pickle

    img = Image.new("RGB", (300, 150), (255, 0, 0))
    t = pickle.loads(pickle.dumps(eval_transform_uint8(224)))(img)  # picklable, for spawned workers
    assert t.shape == (3, 224, 224) and t.dtype == torch.uint8
    x = normalise_batch()(t[None])
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225]))


def test_resize_on_device_matches_resize_in_workers(tmp_path, weights):
    # 3 PNGs of different sizes (a list of images reaches the device) then 3 tar JPEGs of one size (a
    # stacked full-size batch) and one file gone (a zero placeholder inside a batch).
    ingest = _pool(tmp_path, 4, tar_n=3)
    rows = pq.read_table(ingest / "manifest.parquet").to_pylist()
    os.remove(rows[1]["source"])
    kw = dict(img_size=32, batch_size=3, num_workers=0, device="cpu", shard_size=4)
    a = run_embed(ingest, weights, tmp_path / "workers", resize_on_device=False, **kw)
    b = run_embed(ingest, weights, tmp_path / "device", resize_on_device=True, **kw)
    assert a["counts"] == b["counts"] and b["counts"]["failed"] == 1 and b["params"]["resize_on_device"]
    ids_a, va = store.load_embeddings(tmp_path / "workers")
    ids_b, vb = store.load_embeddings(tmp_path / "device")
    assert ids_a == ids_b and len(ids_a) == 6
    assert (va * vb).sum(1).min() > 0.999


def test_pre_reduce_bounds_huge_images():
    from curation.embed_data import pre_reduce

    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (15, 20, 3), dtype=np.uint8)
    big = Image.fromarray(small).resize((2000, 1500), Image.BILINEAR)  # smooth content
    assert pre_reduce(big, 224).size == (1000, 750)  # 1500 // 512 = 2
    assert pre_reduce(Image.new("RGB", (900, 600)), 224).size == (900, 600)  # under 2x the 256 target
    direct = torch.nn.functional.interpolate(
        torch.from_numpy(np.array(big)).permute(2, 0, 1)[None].float(), size=(256, 341), mode="bicubic",
        antialias=True)[0, :, 16:240, 58:282]  # fmt: skip
    ours = eval_transform_uint8(224)(big).float()
    assert (ours - direct).abs().mean() < 1.0  # grey levels: the shortcut is invisible


def test_file_gone_since_ingest_is_quarantined(tmp_path, weights):
    ingest = _pool(tmp_path, 4)
    rows = pq.read_table(ingest / "manifest.parquet").to_pylist()
    Path(rows[1]["source"]).write_bytes(b"not an image any more")
    os.remove(rows[2]["source"])
    m = run_embed(ingest, weights, tmp_path / "emb", img_size=32, batch_size=2, num_workers=0, device="cpu")
    assert m["counts"]["embedded"] == 2 and m["counts"]["failed"] == 2
    q = pq.read_table(tmp_path / "emb" / "quarantine.parquet").to_pylist()
    assert {r["id"] for r in q} == {rows[1]["id"], rows[2]["id"]}
    assert {r["id"]: r["reason"] for r in q}[rows[1]["id"]] == "not-an-image"
    assert {r["id"]: r["reason"] for r in q}[rows[2]["id"]].startswith("unreadable")
    assert [r["id"] for r in store.read_index(tmp_path / "emb").to_pylist()] == [rows[0]["id"], rows[3]["id"]]


def test_bad_arguments_are_user_errors(tmp_path, weights):
    ingest = _pool(tmp_path, 2)
    with pytest.raises(UserError, match="allow-random-init"):
        run_embed(ingest, None, tmp_path / "e1", device="cpu")
    with pytest.raises(UserError, match="no ingest manifest"):
        run_embed(tmp_path, weights, tmp_path / "e2", device="cpu")
    with pytest.raises(UserError, match="not found"):
        run_embed(ingest, tmp_path / "missing.pt", tmp_path / "e3", device="cpu")
    with pytest.raises(UserError, match="multiple of the model's patch size"):
        run_embed(ingest, weights, tmp_path / "e4", img_size=40, device="cpu")
    # random init only when asked for, and then reproducible (the seed is part of the job)
    a = run_embed(ingest, None, tmp_path / "r1", arch="vit_tiny", patch_size=16, img_size=32,
                  allow_random_init=True, num_workers=0, device="cpu")  # fmt: skip
    b = run_embed(ingest, None, tmp_path / "r2", arch="vit_tiny", patch_size=16, img_size=32,
                  allow_random_init=True, num_workers=0, device="cpu")  # fmt: skip
    assert a["digest"] == b["digest"] and a["dim"] == 192


_CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from curation.embed import run_embed
def slow(done, total):
    time.sleep(0.3)   # give the parent time to kill us between shards
run_embed({ingest!r}, {weights!r}, {out!r}, img_size=32, batch_size=2, num_workers=1, device="cpu",
          shard_size=4, progress=slow)
"""


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, weights):
    ingest = _pool(tmp_path, 14)
    out = tmp_path / "killed"
    script = _CHILD.format(root=str(ROOT), ingest=str(ingest), weights=str(weights), out=str(out))
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    work = Path(str(out) + ".partial")
    deadline = time.time() + 120
    while not store.shard_path(work, 1).exists():  # two shards done, more to go
        assert child.poll() is None, "the child finished or died before it could be killed"
        assert time.time() < deadline, "no shard written in time"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not out.exists() and len(store.completed_shards(work)) < 4  # 14 rows / 4 = 4 shards

    # (in-process decoding here: the worker count does not change a single byte, and spawning costs seconds)
    resumed = run_embed(ingest, weights, out, img_size=32, batch_size=2, num_workers=0, device="cpu", shard_size=4)
    clean = run_embed(ingest, weights, tmp_path / "clean", img_size=32, batch_size=2, num_workers=0,
                      device="cpu", shard_size=4)  # fmt: skip
    assert resumed["digest"] == clean["digest"]
    for s in range(4):
        assert store.shard_path(out, s).read_bytes() == store.shard_path(tmp_path / "clean", s).read_bytes()
    assert store.read_index(out).equals(store.read_index(tmp_path / "clean"))
    assert store.read_index(out).num_rows == 14


def test_leftover_of_another_job_is_discarded(tmp_path, weights):
    ingest = _pool(tmp_path, 6)
    out = tmp_path / "emb"
    r = run_embed(ingest, weights, out, img_size=32, batch_size=2, num_workers=0, device="cpu", shard_size=2,
                  stop_after_shards=1)  # fmt: skip
    assert r["stopped_early"] and store.completed_shards(Path(str(out) + ".partial")) == [0]
    # Other weights: the shard written with the old model must not be reused.
    torch.manual_seed(9)
    other = save_backbone(build_vit("vit_tiny", **TINY), tmp_path / "other.pt")
    m = run_embed(ingest, other, out, img_size=32, batch_size=2, num_workers=0, device="cpu", shard_size=2)
    fresh = run_embed(ingest, other, tmp_path / "fresh", img_size=32, batch_size=2, num_workers=0, device="cpu",
                      shard_size=2)  # fmt: skip
    assert m["digest"] == fresh["digest"]


def test_a_worker_reloads_files_rewritten_at_the_same_paths(tmp_path, monkeypatch):
    """A long-lived Dask/Ray worker embedding again at the same paths (new manifest, retrained weights)."""
    import curation.embed as ce

    monkeypatch.setattr(ce, "build_embedder", lambda weights, **kw: Path(weights).read_text())
    monkeypatch.setattr(ce, "read_manifest_table", lambda path: Path(path).read_text())
    manifest, weights = tmp_path / "manifest.parquet", tmp_path / "weights.pt"
    spec = ce.EmbedUnitSpec(str(manifest), str(weights), "vit_tiny", 16, 32, None, False, 0, "cpu",
                            str(tmp_path / "work"), 2, 2, 0, False, False, 1 << 20)
    manifest.write_text("manifest 1")
    weights.write_text("weights 1")
    assert ce._unit_inputs(spec) == ("weights 1", "manifest 1")
    manifest.write_text("manifest 2 (longer)")
    weights.write_text("weights 2 (longer)")
    assert ce._unit_inputs(spec) == ("weights 2 (longer)", "manifest 2 (longer)")


def test_dataset_reports_reasons_instead_of_raising(tmp_path):
    ds = ManifestImages(crop=32)
    i, img, reason = ds[(0, str(tmp_path / "nope.png"), None)]
    assert i == 0 and img.shape == (3, 32, 32) and reason.startswith("unreadable")


def test_cli_arch_choices_match_presets():
    from lvdflow.commands.embed import ARCH_CHOICES
    from pretrain.models import ARCHS

    assert set(ARCH_CHOICES) == set(ARCHS)


def test_cli_rejects_missing_weights(tmp_path, capsys):
    from lvdflow.cli import main

    ingest = _pool(tmp_path, 1)
    assert main(["embed", str(ingest), "--out", str(tmp_path / "e")]) == 2
    assert "--weights CKPT is required" in capsys.readouterr().err
    assert main(["embed", str(ingest), "--weights", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "e")]) == 2
    assert "weights file does not exist" in capsys.readouterr().err


@pytest.mark.usefixtures("prefect_server")
def test_embed_flow_runs_and_caches(tmp_path, weights):
    from flows.embed import embed_flow
    from tests.prefect_helpers import task_states

    ingest = _pool(tmp_path, 3)
    # A decode worker started from inside a Prefect task (forked there, workers could die in interpreter
    # shutdown with exit code 1; the stage spawns them)
    kw = dict(manifest=str(ingest), weights=str(weights), out=str(tmp_path / "emb"), img_size=32, batch_size=1,
              num_workers=1, device="cpu")  # fmt: skip
    s1 = embed_flow(return_state=True, **kw)
    assert s1.is_completed() and s1.result()["counts"]["embedded"] == 3
    assert task_states(s1.state_details.flow_run_id)["embed"] == "Completed"
    s2 = embed_flow(return_state=True, **kw)
    assert task_states(s2.state_details.flow_run_id)["embed"] == "Cached"


@pytest.mark.cuda
def test_cuda_bf16_embeddings_agree_with_cpu_fp32(tmp_path, weights):
    ingest = _pool(tmp_path, 10)
    kw = dict(img_size=32, batch_size=4, num_workers=2, shard_size=6)
    run_embed(ingest, weights, tmp_path / "cpu", device="cpu", **kw)
    m = run_embed(ingest, weights, tmp_path / "gpu", device="cuda", **kw)  # compiled blocks, bf16, fused GELU
    assert m["params"]["precision"] == "bf16" and m["counts"]["embedded"] == 10
    ids_c, c = store.load_embeddings(tmp_path / "cpu")
    ids_g, g = store.load_embeddings(tmp_path / "gpu")
    assert ids_c == ids_g
    cos = (c * g).sum(1)
    assert cos.min() > 0.99, cos


def test_short_batches_are_padded_to_the_compiled_shape(weights):
    # With compiled blocks every forward must see batch_size images (a new size would recompile mid-run).
    from curation.embed import _Embedder
    from curation.embed_data import DeviceTransform
    from pretrain.models import load_backbone

    model = load_backbone(weights)
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    e = _Embedder(model, torch.device("cpu"), compile=False, transform=DeviceTransform(32, torch.device("cpu"), False),
                  batch_size=4)  # fmt: skip
    imgs = torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8)
    _, plain, _ = e.submit((torch.arange(3), imgs, ["", "", ""]))
    e.static_batch = 4  # what compile=True sets
    _, padded, _ = e.submit((torch.arange(3), imgs, ["", "", ""]))
    assert seen == [3, 4] and padded.shape == (3, 64)
    np.testing.assert_allclose(padded, plain, atol=1e-5)


def test_device_transform_normalises_like_the_v2_transforms():
    from curation.embed_data import DeviceTransform

    batch = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    got = DeviceTransform(8, torch.device("cpu"), False)(batch)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, normalise_batch()(batch), rtol=1e-6, atol=1e-6)
