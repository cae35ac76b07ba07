"""bench/bench_pretrain_gpu.py on the CPU: the path that a lent GPU's few minutes are spent on must run before
it gets there, and the FLOPs behind its MFU figure must be the step's real matmul work."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from bench import bench_pretrain_gpu as bench
from pretrain.config import TrainConfig
from pretrain.models import vit_config, vit_forward_flops

# Heads this small are a fraction of a percent of a ViT-Tiny step, so the backbone formula must explain the count.
TINY_HEADS = dict(dino_prototypes=128, ibot_prototypes=128, head_hidden_dim=64, head_bottleneck_dim=32)


def _step_flops(drop_path_rate: float, batch: int = 2) -> tuple[int, float]:
    cfg = TrainConfig(arch="vit_tiny", batch_size_per_rank=batch, drop_path_rate=drop_path_rate,
                      **TINY_HEADS).validate()
    counted = bench.count_step_flops(cfg, bench.synthetic_batch(batch, 8, torch.device("cpu")), torch.device("cpu"))
    vit = vit_config("vit_tiny", patch_size=14)
    g, loc = vit_forward_flops(vit, 224), vit_forward_flops(vit, 98)
    # Student: 2 global + 8 local crops, forward and backward (3x forward); teacher: the 2 global crops, forward.
    formula = batch * (3 * (2 * g + 8 * loc) + 2 * g)
    return counted, formula


def test_counted_step_flops_match_the_vit_formula_attention_included():
    counted, formula = _step_flops(0.0)
    # Attention is 18% of a ViT-Tiny block at 224 px: counting it as zero (SDPA's CPU kernel has no FLOP
    # formula) would land near 0.86; the heads and patch-embedding backward keep it within 1%.
    assert counted / formula == pytest.approx(1.0, abs=0.01)


def test_counted_flops_are_those_executed_under_stochastic_depth():
    full, formula = _step_flops(0.0)
    subset, _ = _step_flops(0.4)
    # Rate 0.4 on a batch of 2 runs each student branch on 1 sample: the student's blocks do half their work.
    assert 0.55 < subset / full < 0.7
    assert full == pytest.approx(formula, rel=0.01)


def test_fake_tensor_count_equals_the_real_one():
    # --flops-only counts ViT-L on fake tensors; that is only sound if shapes alone give the real step's count.
    cfg = bench.recipe_config("vit_tiny", batch_size_per_rank=2, drop_path_rate=0.4, **TINY_HEADS)
    batch = bench.synthetic_batch(2, 8, torch.device("cpu"))
    real = bench.count_step_flops(cfg, batch, torch.device("cpu"))
    assert bench.count_step_flops(cfg, batch, torch.device("cpu"), fake=True) == real > 0


def test_vit_large_recipe_is_the_production_profile():
    from pretrain.config import load_config, profile_path

    profile = load_config(profile_path("vitl14"))
    cfg = bench.recipe_config("vit_large")
    for field in bench.RECIPE_FIELDS:
        assert getattr(cfg, field) == getattr(profile, field), field
    assert (cfg.global_crops_size, cfg.local_crops_size, cfg.local_crops_number) == (224, 98, 8)


def test_flops_only_writes_executed_and_full_counts(tmp_path, monkeypatch):
    out = tmp_path / "flops.json"
    monkeypatch.setattr(sys, "argv", ["bench_pretrain_gpu.py", "--flops-only", "--archs", "vit_tiny", "--batch", "2",
                                      "--result", str(out)])
    assert bench.main() == 0
    (row,) = json.loads(out.read_text())["rows"]
    # vit_tiny takes ViT-S's recipe (rate 0.1: per-sample drop path, nothing skipped).
    assert row["tflops_per_step"] == row["tflops_per_step_without_drop_path_savings"] > 0
    assert row["executed_fraction"] == 1.0


def test_counting_leaves_the_xformers_switch_as_it_was(monkeypatch):
    monkeypatch.setenv("LVDFLOW_DISABLE_XFORMERS", "0")
    with bench.pytorch_math_attention():
        assert bench.os.environ["LVDFLOW_DISABLE_XFORMERS"] == "1"
    assert bench.os.environ["LVDFLOW_DISABLE_XFORMERS"] == "0"
    monkeypatch.delenv("LVDFLOW_DISABLE_XFORMERS")
    with bench.pytorch_math_attention():
        pass
    assert "LVDFLOW_DISABLE_XFORMERS" not in bench.os.environ


def test_bench_main_runs_on_cpu_and_writes_its_row(tmp_path, monkeypatch):
    out = tmp_path / "pretrain_gpu_cpu.json"
    argv = ["bench_pretrain_gpu.py", "--device", "cpu", "--archs", "vit_tiny", "--batch", "2", "--steps", "1",
            "--warmup", "1", "--result", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    assert bench.main() == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu"
    (row,) = result["rows"]
    assert row["arch"] == "vit_tiny" and row["batch"] == 2 and row["gpu"] == "cpu"
    assert math.isfinite(row["loss"]) and row["s_per_step"] > 0
    assert row["tflops_per_step"] > 0 and row["mfu_percent"] is None  # no peak to divide by on a CPU
    # ViT-S's recipe heads at rate 0.1 take the per-sample drop path, which saves nothing.
    assert row["tflops_per_step_without_drop_path_savings"] == row["tflops_per_step"]


@pytest.mark.parametrize(("args", "message"), [
    (["--device", "cpu", "--archs", "vit_tiny,vit_nope"], "unknown --archs vit_nope"),
    (["--device", "cpu", "--fsdp", "--archs", "vit_tiny"], "needs --device cuda"),
    (["--device", "cpu", "--archs", "vit_tiny", "--batch", "1"], "batch_size_per_rank must be >= 2"),
])
def test_bench_main_refuses_bad_options_in_one_line(args, message, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["bench_pretrain_gpu.py", *args, "--result", str(tmp_path / "r.json")])
    assert bench.main() == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a CUDA device")
def test_bench_main_without_cuda_says_so(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_pretrain_gpu.py", "--archs", "vit_tiny"])
    assert bench.main() == 1
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "kind"), [
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "gemm"),
    ("triton_per_fused_native_layer_norm_0", "compiled (triton)"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>", "optimizer / EMA / clip (foreach)"),
    ("ncclDevKernel_AllGather_RING_LL", "collectives"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>",
     "eager elementwise / other"),
])
def test_kernel_kinds(name, kind):
    assert bench.kernel_kind(name) == kind


def test_bench_row_counts_stochastic_depths_savings_apart():
    row = bench.bench_arch("vit_tiny", steps=1, warmup=0, batch=2, device="cpu", drop_path_rate=0.4, **TINY_HEADS)
    # Rate 0.4 on 2 images: each student branch runs on one, so the executed count is well below the full one.
    assert 0.55 < row["tflops_per_step"] / row["tflops_per_step_without_drop_path_savings"] < 0.75
