"""Distillation: frozen teacher (bitwise unchanged, no gradients), students learn, one teacher pass for
several students, exact resume, exports, masking flag, teacher formats, config and CLI errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lvdflow.errors import UserError
from lvdflow.net import free_port
from pretrain.data import BatchStream
from pretrain.distill.config import DistillConfig, load_distill_config
from pretrain.distill.meta_arch import unmasked_ibot_batch
from pretrain.distill.teacher import load_teacher
from pretrain.distill.train import build_distill, distill
from pretrain.loop import lr_and_schedules, optimizer_step, to_device
from pretrain.metrics_log import read_metrics
from pretrain.models.checkpoint import export_official, load_backbone
from pretrain.train import build_augmentation, train

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_helpers import ListStream, tiny_config, toy_images  # noqa: E402
# The trainer tests' helper: a stream that dies like a killed process.
from test_pretrain_train import Crash, CrashingStream  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A pretraining run of the tiny config (3 iterations): teacher/teacher_checkpoint.pth with its heads."""
    out = tmp_path_factory.mktemp("teacher")
    train(tiny_config(total_iters=3, embed_dim=48, num_heads=3), out, dataset=ListStream(toy_images(12)))
    return out


def dcfg(**overrides) -> DistillConfig:
    base = tiny_config().to_dict()
    base.update(students=["vit_tiny"], drop_path_rate=0.0, total_iters=4, checkpoint_every=2)
    base.update(overrides)
    return DistillConfig(**base).validate()


def _steps(cfg, teacher_run, n):
    """`n` distillation steps by hand; returns the meta-architecture and the metrics of each step."""
    torch.manual_seed(0)
    meta, _ = build_distill(cfg, teacher_run)
    groups = [g for st in meta.students.values() for g in
              __import__("pretrain.param_groups", fromlist=["x"]).param_groups(st.student, num_layers=2)]
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups])
    _, sched = lr_and_schedules(cfg, cfg.batch_size_per_rank)
    stream = BatchStream(ListStream(toy_images(12)), batch_size=cfg.batch_size_per_rank, seed=0, rank=0,
                         mask_probability=0.5 if cfg.masking else 0.0)
    aug = build_augmentation(cfg)
    history = []
    import contextlib

    for it in range(n):
        batch = to_device(stream.next_batch(it, aug, cfg.patch_size), torch.device("cpu"))
        if not cfg.masking:
            batch = unmasked_ibot_batch(batch, cfg.patch_size)
        history.append(optimizer_step(meta, opt, batch, sched.at(it), cfg=cfg,
                                      clip_modules=[st.student[k] for st in meta.students.values() for k in st.student],
                                      autocast=contextlib.nullcontext(), update_ema=meta.update_emas))
    return meta, history


def test_teacher_stays_frozen_and_only_students_get_gradients(teacher_run):
    cfg = dcfg()
    torch.manual_seed(0)
    reference, _ = build_distill(cfg, teacher_run)
    before = {k: v.clone() for k, v in reference.teacher.state_dict().items()}
    meta, history = _steps(cfg, teacher_run, 3)
    after = meta.teacher.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # bitwise
    assert all(p.grad is None and not p.requires_grad for p in meta.teacher.parameters())
    assert not meta.teacher.training and meta.students.training  # .train() does not wake the teacher
    student = meta.students["vit_tiny"]
    assert all(p.grad is not None for p in student.student["backbone"].blocks.parameters())
    assert all(p.grad is None for p in student.ema.parameters())
    # the student moved, and its EMA followed it part of the way
    fresh, _ = build_distill(cfg, teacher_run)
    w0 = fresh.students["vit_tiny"].student["backbone"].blocks[0].attn.qkv.weight
    w = student.student["backbone"].blocks[0].attn.qkv.weight
    e = student.ema["backbone"].blocks[0].attn.qkv.weight
    assert not torch.equal(w, w0) and not torch.equal(e, w0) and not torch.equal(e, w)
    for h in history:
        assert all(torch.isfinite(v) for v in h.values())
        assert h["vit_tiny/ibot_loss"] > 0 and h["vit_tiny/dino_global_crops_loss"] > 0


def test_the_student_approaches_the_teacher(teacher_run):
    """KL(teacher targets || student) on the global pairs falls (the cross-entropy itself may rise while the
    centring flattens the targets: their entropy grows)."""
    cfg = dcfg(base_lr=3e-3, warmup_iters=0, freeze_last_layer_iters=0, warmup_teacher_temp=0.07)
    _, history = _steps(cfg, teacher_run, 15)
    kl = [float(h["vit_tiny/teacher_student_kl"]) for h in history]
    assert sum(kl[-3:]) < 0.7 * sum(kl[1:4])


def test_several_students_share_one_teacher_pass(teacher_run, tmp_path):
    cfg = dcfg(students=["vit_tiny", {"arch": "vit_small", "name": "wide", "embed_dim": 64, "num_heads": 4}],
               total_iters=3, checkpoint_every=3)
    calls = []
    from pretrain.distill import train as dtrain

    real = dtrain.build_distill

    def counting_build(*a, **kw):
        meta, info = real(*a, **kw)
        meta.teacher["backbone"].register_forward_hook(lambda *_: calls.append(1))
        return meta, info

    dtrain.build_distill = counting_build
    try:
        s = distill(cfg, tmp_path, teacher=teacher_run, dataset=ListStream(toy_images(12)))
    finally:
        dtrain.build_distill = real
    assert len(calls) == 3 and s["teacher_forwards"] == 3  # one teacher forward per step, not per student
    assert set(s["students"]) == {"vit_tiny", "wide"}
    rec = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "total_loss" in r][-1]
    assert rec["total_loss"] == pytest.approx(rec["vit_tiny/total_loss"] + rec["wide/total_loss"], rel=1e-5)
    wide = load_backbone(s["students"]["wide"]["backbone"])
    assert wide.embed_dim == 64 and wide.num_heads == 4 and len(wide.blocks) == 2


def test_kill_and_resume_reproduces_the_uninterrupted_run_bitwise(teacher_run, tmp_path):
    images = toy_images(10)
    cfg = dcfg(total_iters=5, checkpoint_every=2)
    distill(cfg, tmp_path / "full", teacher=teacher_run, dataset=ListStream(images))
    with pytest.raises(Crash):  # dies during iteration 3, after the checkpoint at 2
        distill(cfg, tmp_path / "killed", teacher=teacher_run,
                dataset=CrashingStream(images, crash_after=3 * cfg.batch_size_per_rank + 1))
    resumed = distill(cfg, tmp_path / "killed", teacher=teacher_run, dataset=ListStream(images))
    assert resumed["resumed_from"] == 2

    def losses(run):
        return [{k: v for k, v in r.items() if k.endswith("loss") or k == "iteration"}
                for r in read_metrics(run / "metrics.jsonl") if "total_loss" in r]

    a, b = losses(tmp_path / "full"), losses(tmp_path / "killed")
    assert [r["iteration"] for r in a] == list(range(5)) and a == b
    sa = torch.load(tmp_path / "full" / "students" / "vit_tiny" / "student_official.pth")
    sb = torch.load(tmp_path / "killed" / "students" / "vit_tiny" / "student_official.pth")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the teacher is not in the training checkpoints (it is reloaded from its own file)
    ck = json.loads((tmp_path / "full" / "checkpoints" / "latest").read_text())["checkpoint"]
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(tmp_path / "full" / "checkpoints" / ck)).read_metadata().state_dict_metadata
    assert any(k.startswith("model.students.vit_tiny.student.backbone.") for k in keys)
    assert any(k.startswith("model.students.vit_tiny.teacher.backbone.") for k in keys)  # the EMA
    assert not any(k.startswith("model.teacher.") for k in keys)


def test_exports_load_and_a_student_can_teach_in_turn(teacher_run, tmp_path):
    s = distill(dcfg(total_iters=2), tmp_path, teacher=teacher_run, dataset=ListStream(toy_images(8)))
    d = tmp_path / "students" / "vit_tiny"
    own = load_backbone(d / "student_backbone.pth")
    official = load_backbone(d / "student_official.pth", num_heads=2)
    sd = torch.load(d / "student_checkpoint.pth")["teacher"]
    assert all(torch.equal(own.state_dict()[k], official.state_dict()[k]) for k in own.state_dict())
    assert all(torch.equal(own.state_dict()[k], sd["backbone." + k]) for k in own.state_dict())  # the EMA
    assert s["students"]["vit_tiny"]["params"] == sum(p.numel() for p in own.parameters())
    from pretrain.models.checkpoint import EVAL_IMAGE_SIZE_KEY, load_state_dict_any

    assert load_state_dict_any(d / "student_backbone.pth")[1]["extra"][EVAL_IMAGE_SIZE_KEY] == 16  # its crops
    teacher, info = load_teacher(d / "student_checkpoint.pth")
    assert info["heads"] == "trained" and teacher["backbone"].embed_dim == 32


def test_distillation_starts_from_the_teachers_saved_centres(teacher_run, tmp_path):
    saved = torch.load(teacher_run / "teacher" / "teacher_checkpoint.pth")["centers"]
    assert saved["dino"].abs().sum() > 0  # the pretraining run moved its centres away from zero
    meta, info = build_distill(dcfg(), teacher_run)
    assert info["centers"] == "saved"
    assert torch.equal(meta.dino_loss.center, saved["dino"]) and torch.equal(meta.ibot_loss.center, saved["ibot"])
    # fresh heads (and bare backbones) have no centres of their own: zeros, as in pretraining
    meta, info = build_distill(dcfg(teacher_heads="fresh"), teacher_run)
    assert info["centers"] == "zeros" and not meta.dino_loss.center.any()


def test_feature_loss_aligns_the_projected_student_cls_with_the_teachers(teacher_run, tmp_path):
    cfg = dcfg(feature_weight=1.0, base_lr=3e-3, warmup_iters=0, freeze_last_layer_iters=0)
    meta, history = _steps(cfg, teacher_run, 15)
    feat = [float(h["vit_tiny/feature_loss"]) for h in history]
    assert sum(feat[-3:]) < 0.7 * sum(feat[:3])
    student = meta.students["vit_tiny"]
    assert student.student["feature_proj"].weight.grad is not None
    assert not student.ema["feature_proj"].weight.requires_grad  # the EMA copy follows, never trains
    assert student.student["feature_proj"].out_features == meta.teacher["backbone"].embed_dim
    # a distilled student with the projector still exports a plain backbone and can teach in turn
    distill(dcfg(feature_weight=1.0, total_iters=2), tmp_path, teacher=teacher_run, dataset=ListStream(toy_images(8)))
    teacher, info = load_teacher(tmp_path / "students" / "vit_tiny" / "student_checkpoint.pth")
    assert info["heads"] == "trained" and teacher["backbone"].embed_dim == 32


def test_masking_flag_masks_students_and_ibot_uses_masked_patches(teacher_run):
    cfg = dcfg(masking=True, mask_probability=0.5)
    meta, history = _steps(cfg, teacher_run, 2)
    assert all(torch.isfinite(h["vit_tiny/ibot_loss"]) and h["vit_tiny/ibot_loss"] > 0 for h in history)
    # the student's mask token only gets a gradient when it replaces patches
    assert meta.students["vit_tiny"].student["backbone"].mask_token.grad.abs().sum() > 0
    meta, _ = _steps(dcfg(), teacher_run, 1)
    token = meta.students["vit_tiny"].student["backbone"].mask_token
    assert token.grad is None and not token.requires_grad  # unused without masking: frozen


def test_unmasked_batch_weights_every_patch_of_every_global_crop():
    batch = {"global_crops": torch.zeros(6, 3, 16, 16), "masks": torch.zeros(6, 16, dtype=torch.bool)}
    b = unmasked_ibot_batch(batch, patch_size=4)
    assert b["masks"] is None and torch.equal(b["mask_indices"], torch.arange(96))
    assert torch.allclose(b["masks_weight"].view(6, 16).sum(1), torch.ones(6))


def test_bare_backbone_teacher_gets_seeded_heads_and_grids_are_matched(teacher_run, tmp_path):
    bare = load_backbone(teacher_run / "teacher" / "teacher_backbone.pth")
    export_official(bare, tmp_path / "official.pth")
    t1, info = load_teacher(tmp_path / "official.pth", head_hidden_dim=32, head_bottleneck_dim=16,
                            dino_prototypes=64, seed=3)
    t2, _ = load_teacher(tmp_path / "official.pth", head_hidden_dim=32, head_bottleneck_dim=16,
                         dino_prototypes=64, seed=3)
    assert info["heads"] == "initialised" and not any(p.requires_grad for p in t1.parameters())
    _, run_info = load_teacher(teacher_run, heads="fresh", head_hidden_dim=32, head_bottleneck_dim=16,
                               dino_prototypes=64)
    assert run_info["heads"] == "initialised" and run_info["dino_prototypes"] == 64
    assert all(torch.equal(a, b) for a, b in zip(t1.state_dict().values(), t2.state_dict().values()))
    # a /8 student of a /4 teacher: the teacher sees the crops upsized so both grids are 4 x 4
    cfg = dcfg(patch_size=8, img_size=32, global_crops_size=32, local_crops_size=16)
    meta, _ = build_distill(cfg, tmp_path / "official.pth")
    assert meta._teacher_input(torch.zeros(2, 3, 32, 32)).shape[-1] == 16
    _, history = _steps(cfg, tmp_path / "official.pth", 1)
    assert torch.isfinite(history[0]["total_loss"])


def test_config_profile_and_errors(tmp_path):
    from pretrain.config import profile_path

    cfg = load_distill_config(profile_path("distill_demo"))
    assert cfg.drop_path_rate == 0.0 and cfg.masking is False
    assert cfg.student_specs() == [{"name": "vit_tiny", "arch": "vit_tiny", "overrides": {"depth": 4, "embed_dim": 64, "num_heads": 1}}]
    two = load_distill_config(profile_path("distill_demo"), {"students": ["vit_tiny", "vit_tiny"]})
    assert [s["name"] for s in two.student_specs()] == ["vit_tiny", "vit_tiny_2"]
    with pytest.raises(UserError, match="unknown student arch"):
        load_distill_config(None, {"students": ["vit_mega"]})
    with pytest.raises(UserError, match="unknown training config keys"):
        load_distill_config(None, {"studnets": ["vit_tiny"]})
    with pytest.raises(UserError, match="no teacher_checkpoint.pth"):
        load_teacher(tmp_path)


def test_distillation_lr_peaks_at_the_papers_1e3_at_batch_2048_and_the_demo_keeps_its_own():
    """Table 16 lists LRs after the sqrt batch rule: distilled S/B/L peak at 1e-3 at batch 2048."""
    from pretrain.config import profile_path

    lr, sched = lr_and_schedules(DistillConfig(), 2048)
    assert lr == pytest.approx(1e-3)
    prod = load_distill_config(profile_path("distill_vitl_to_vits"))
    lr, sched = lr_and_schedules(prod, 2048)
    assert lr == pytest.approx(1e-3)
    assert (prod.total_iters, prod.warmup_iters) == (625_000, 100_000)
    assert sched.at(prod.warmup_iters)["lr"] == pytest.approx(1e-3, rel=1e-4)
    demo = load_distill_config(profile_path("distill_demo"))
    assert (demo.base_lr, demo.lr_scaling) == (2e-3, "none")  # the figures in bench/results/distill_demo*.json
    assert lr_and_schedules(demo, 32 * 4)[0] == 2e-3


def test_resume_with_other_students_is_refused(teacher_run, tmp_path):
    distill(dcfg(total_iters=2, checkpoint_every=1, stop_after=1), tmp_path, teacher=teacher_run,
            dataset=ListStream(toy_images(8)))
    with pytest.raises(UserError, match="other students"):
        distill(dcfg(total_iters=2, students=["vit_small"]), tmp_path, teacher=teacher_run,
                dataset=ListStream(toy_images(8)))


def test_cli_checks_inputs_before_prefect(tmp_path, capsys):
    from lvdflow.cli import main

    (tmp_path / "shards").mkdir()
    assert main(["distill", "--teacher", str(tmp_path / "nope"), "--shards", str(tmp_path / "shards"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "teacher does not exist" in capsys.readouterr().err
    assert main(["distill", "--teacher", str(tmp_path), "--shards", str(tmp_path / "shards"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "no .tar shards" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["distill", "--teacher", str(tmp_path), "--shards", str(tmp_path), "--out", "o", "--arch", "vit_mega"])


@pytest.mark.slow
def test_fsdp2_two_cpu_processes_then_resume_in_one(teacher_run, tmp_path):
    """torchrun, 2 processes, gloo: students, their EMAs and the teacher are sharded, two students train
    from one teacher pass, and the DCP checkpoint resumes in one process (another world size)."""
    import os
    import subprocess

    from distill_torchrun_worker import tiny_distill_config

    out = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    worker = Path(__file__).with_name("distill_torchrun_worker.py")
    proc = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                           "--master-port", str(free_port()), str(worker), str(teacher_run), str(out), "2"],
                          capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "worker.json").read_text())
    assert s["world_size"] == 2 and s["iterations_done"] == 2 and s["teacher_forwards"] == 2
    for local, total in s["sizes"].values():
        assert local < 0.6 * total  # about half per rank
    ck = out / "checkpoints" / "it_00000002"
    assert {"__0_0.distcp", "__1_0.distcp", "rank_0.pt", "rank_1.pt"} <= {p.name for p in ck.iterdir()}
    resumed = distill(tiny_distill_config(), out, teacher=teacher_run, dataset=ListStream(toy_images(32)[::2]))
    assert resumed["resumed_from"] == 2 and resumed["world_size"] == 1
    assert [r["iteration"] for r in read_metrics(out / "metrics.jsonl") if "total_loss" in r] == list(range(4))
    assert set(resumed["students"]) == {"vit_tiny", "wide"}


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_distill_flow_reads_shards_publishes_and_caches(teacher_run, tmp_path):
    import numpy as np

    from _retrieval_data import write_images, write_manifest
    from flows.distill import distill_flow
    from lvdflow.stage import is_complete
    from shards.writer import run_shard
    from tests.prefect_helpers import task_states

    table = write_images(tmp_path / "img", 12, np.random.default_rng(0))
    write_manifest(table, tmp_path / "ingest" / "manifest.parquet")
    run_shard(tmp_path / "ingest", tmp_path / "shards", max_count=5)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(dcfg(total_iters=2, checkpoint_every=2).to_dict()))
    kw = dict(teacher=str(teacher_run), shards=str(tmp_path / "shards"), out=str(tmp_path / "out"),
              config=str(config), overrides={"students": ["vit_tiny", "vit_small"], "embed_dim": 0, "num_heads": 0})
    state = distill_flow(return_state=True, **kw)
    assert state.is_completed(), state
    m = state.result()
    assert task_states(state.state_details.flow_run_id)["distill"] == "Completed"
    assert is_complete(tmp_path / "out") and m["counts"] == {"iterations": 2, "students": 2, "global_batch": 4,
                                                             "teacher_forwards": 2}
    assert load_backbone(m["students"]["vit_small"]["backbone"]).embed_dim == 384
    state = distill_flow(return_state=True, **kw)
    assert task_states(state.state_details.flow_run_id)["distill"] == "Cached"
