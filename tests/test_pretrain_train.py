"""The trainer: kill-and-resume reproduces the uninterrupted run bitwise (CPU, one process), FSDP2 under
torchrun with 2 CPU processes, resume on another process count, NaN handling, configs, exports."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from lvdflow.errors import UserError
from lvdflow.net import free_port
from pretrain.config import TrainConfig, load_config, profile_path
from pretrain.meta_arch import SSLMetaArch, TrainingDiverged
from pretrain.metrics_log import read_metrics
from pretrain.train import train

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_helpers import ListStream, tiny_config, toy_images  # noqa: E402

LOSS_KEYS = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Crash(Exception):
    pass


class CrashingStream(ListStream):
    """Dies (like a killed process) once `crash_after` samples have been drawn."""

    def __init__(self, images, crash_after: int, **kw):
        super().__init__(images, **kw)
        self.crash_after = crash_after
        self.drawn = 0

    def __iter__(self):
        for x in super().__iter__():
            self.drawn += 1
            if self.drawn > self.crash_after:
                raise Crash("killed")
            yield x


def _losses(out: Path) -> list[tuple]:
    return [(r["iteration"],) + tuple(r[k] for k in LOSS_KEYS) for r in read_metrics(out / "metrics.jsonl")
            if "total_loss" in r]


@pytest.mark.parametrize("workers", [0, 2])
def test_kill_and_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path, workers):
    """With data workers too: the interrupted run, its batches made by 2 processes reading ahead (so the
    kill comes while a later batch is read), still gives the uninterrupted inline run's losses."""
    images = toy_images(20)  # not a multiple of the batch: an epoch ends mid-batch
    cfg = tiny_config(total_iters=7, checkpoint_every=3)
    full = train(cfg, tmp_path / "full", dataset=ListStream(images))
    # Killed during iteration 5 (after the checkpoint at 3): resumes from 3 and redoes 3, 4, ... With workers
    # the stream is read 2 batches per worker ahead, so iteration 5 draws batch 5 + 2 * workers.
    pooled = tiny_config(total_iters=7, checkpoint_every=3, data_workers=workers)
    crash_after = (5 + 2 * workers) * cfg.batch_size_per_rank + 1
    with pytest.raises(Crash):
        train(pooled, tmp_path / "killed", dataset=CrashingStream(images, crash_after=crash_after))
    resumed = train(pooled, tmp_path / "killed", dataset=ListStream(images))
    assert resumed["resumed_from"] == 3
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "killed")
    assert [r[0] for r in a] == list(range(7)) and a == b  # exact float equality, every iteration
    ta = torch.load(tmp_path / "full" / "teacher" / "teacher_official.pth")
    tb = torch.load(tmp_path / "killed" / "teacher" / "teacher_official.pth")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert full["last"]["total_loss"] == resumed["last"]["total_loss"]


def test_outputs_exports_and_metrics(tmp_path):
    from pretrain.models.checkpoint import load_backbone

    s = train(tiny_config(total_iters=4, export_every=2), tmp_path, dataset=ListStream(toy_images(12)))
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "exports" / "it_00000002" / "teacher_official.pth").is_file()
    full = torch.load(tmp_path / "teacher" / "teacher_checkpoint.pth")
    assert any(k.startswith("dino_head.last_layer") for k in full["teacher"])  # heads kept for distillation
    model = load_backbone(s["teacher"])
    official = load_backbone(tmp_path / "teacher" / "teacher_official.pth", num_heads=2)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(model.forward_features(x)["x_norm_clstoken"], official.forward_features(x)["x_norm_clstoken"])
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert {"teacher_entropy", "teacher_student_kl", "lr", "momentum", "teacher_temp"} <= set(rows[-1])


@pytest.mark.parametrize("bad_iteration", [0, 2])
def test_nan_loss_stops_with_the_iteration_named(tmp_path, monkeypatch, bad_iteration):
    """The loop reads a step's metrics one step late; the error still names the step, and a checkpoint
    due right after it (iteration 2: checkpoint_every 3) is not written from its weights."""
    real = SSLMetaArch.forward
    calls = {"n": 0}

    def poisoned(self, batch, teacher_temp):
        loss, m = real(self, batch, teacher_temp)
        calls["n"] += 1
        if calls["n"] == bad_iteration + 1:
            loss = loss * float("nan")
            m["total_loss"] = loss.detach()
        return loss, m

    monkeypatch.setattr(SSLMetaArch, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=f"iteration {bad_iteration} "):
        train(tiny_config(), tmp_path, dataset=ListStream(toy_images(12)))
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    # Iteration 0's loss is read while iteration 1 runs; iteration 2's at once, before its checkpoint.
    assert calls["n"] == {0: 2, 2: 3}[bad_iteration]


def test_high_resolution_final_phase_uses_larger_global_crops(tmp_path, monkeypatch):
    import pretrain.train as t

    sizes = []
    real = t.BatchStream.next_batch

    def spy(self, iteration, augmentation, patch_size):
        b = real(self, iteration, augmentation, patch_size)
        sizes.append(b["global_crops"].shape[-1])
        return b

    monkeypatch.setattr(t.BatchStream, "next_batch", spy)
    train(tiny_config(total_iters=4, highres_iters=2, highres_global_crops_size=24, highres_local_crops_size=8),
          tmp_path, dataset=ListStream(toy_images(12)))
    assert sizes == [16, 16, 24, 24]


def test_config_profiles_and_errors(tmp_path):
    demo = load_config(profile_path("demo"))
    assert demo.highres_iters == 0 and demo.total_iters > 0
    p = tmp_path / "c.yaml"
    p.write_text("total_iters: 10\nbatch_size_per_rank: 8\n")
    cfg = load_config(p, {"seed": 3})
    assert (cfg.total_iters, cfg.batch_size_per_rank, cfg.seed) == (10, 8, 3)
    p.write_text("total_iter: 10\n")
    with pytest.raises(UserError, match="total_iter"):
        load_config(p)
    with pytest.raises(UserError, match="multiple of patch_size"):
        TrainConfig(global_crops_size=100, patch_size=14).validate()
    with pytest.raises(UserError, match="KoLeo"):
        TrainConfig(batch_size_per_rank=1).validate()
    # A value of the wrong type (`--set total_iters=abc`) is a one-line error, not a TypeError in validate.
    with pytest.raises(UserError, match=r"total_iters='abc' \(wants int\).*compile='yes' \(wants bool\)"):
        load_config(None, {"total_iters": "abc", "compile": "yes"})
    assert load_config(None, {"base_lr": 1, "global_crops_scale": (0.4, 1.0)}).base_lr == 1  # ints serve as floats
    for name in ("demo", "vitl14", "bootstrap"):  # the bundled profiles pass the check
        assert load_config(profile_path(name)).total_iters > 0


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """One FSDP2 run under torchrun: one node, 2 processes (gloo), 3 iterations; the tests below copy it
    before changing it. Shared because each launch costs ~30 s of interpreters importing torch."""
    from pretrain.launch import Launch, torchrun_module

    out = tmp_path_factory.mktemp("fsdp2") / "run"
    torchrun_module("tests.pretrain_torchrun_worker", [str(out), "3"], Launch(nproc=2), on_output=lambda line: None)
    return out


@pytest.mark.slow
def test_fsdp2_two_cpu_processes_then_resume_in_one(two_processes, tmp_path):
    """torchrun, 2 processes, gloo: the student is sharded, training runs, and its DCP checkpoint resumes
    in a single process (a different world size)."""
    out = tmp_path / "run"
    shutil.copytree(two_processes, out)
    s = json.loads((out / "worker.json").read_text())
    assert s["world_size"] == 2 and s["iterations_done"] == 3
    assert s["student_params_local"] < 0.6 * s["student_params_total"]  # about half per rank
    assert {"__0_0.distcp", "__1_0.distcp", "rank_0.pt", "rank_1.pt"} <= {p.name for p in (out / "checkpoints" / "it_00000003").iterdir()}
    resumed = train(tiny_config(), out, dataset=ListStream(toy_images(32)[::2]))
    assert resumed["resumed_from"] == 3 and resumed["world_size"] == 1
    assert [r["iteration"] for r in read_metrics(out / "metrics.jsonl") if "total_loss" in r] == list(range(6))


@pytest.mark.slow
def test_two_nodes_at_a_rendezvous_train_as_one_node_with_two_processes(two_processes, tmp_path):
    """Multi-node launch (pretrain.launch): two torchrun agents, one process each, meet at a c10d rendezvous
    as two nodes would (here both on this machine, sharing the run directory as nodes share storage), and
    train FSDP2 exactly as one node with two processes does: same losses bit for bit, one DCP shard each."""
    from pretrain.launch import Launch, torchrun_module

    def launch(out: Path, how: Launch) -> None:
        torchrun_module("tests.pretrain_torchrun_worker", [str(out), "3"], how, on_output=lambda line: None)

    nodes = Launch(nproc=1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{free_port()}", rdzv_id="two-nodes")
    with ThreadPoolExecutor(2) as pool:  # both agents at once: each waits at the rendezvous for the other
        list(pool.map(lambda _: launch(tmp_path / "nodes", nodes), range(2)))  # list(): a node's error is raised

    summary = json.loads((tmp_path / "nodes" / "worker.json").read_text())
    assert summary["world_size"] == 2 and summary["iterations_done"] == 3
    assert {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in (tmp_path / "nodes" / "checkpoints" / "it_00000003").iterdir()}
    assert len(_losses(tmp_path / "nodes")) == 3
    assert _losses(tmp_path / "nodes") == _losses(two_processes)


@pytest.mark.cuda
def test_fsdp2_over_nccl_on_one_gpu_then_resume_without_torchrun(tmp_path):
    """torchrun with one GPU process: it joins an NCCL group and trains FSDP2-sharded blocks in bf16 mixed
    precision, the code path of a multi-GPU job; its DCP checkpoint then resumes in a plain CUDA process."""
    out = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    worker = Path(__file__).with_name("pretrain_torchrun_worker.py")
    proc = subprocess.run([str(torchrun), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
                           "--master-port", str(free_port()), str(worker), str(out), "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "worker.json").read_text())
    assert s["backend"] == "nccl" and s["world_size"] == 1 and s["iterations_done"] == 3
    assert {"__0_0.distcp", "rank_0.pt"} <= {p.name for p in (out / "checkpoints" / "it_00000003").iterdir()}
    resumed = train(tiny_config(), out, dataset=ListStream(toy_images(32)))
    assert resumed["resumed_from"] == 3 and resumed["world_size"] == 1
    losses = [r["total_loss"] for r in read_metrics(out / "metrics.jsonl") if "total_loss" in r]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
