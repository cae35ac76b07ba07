"""Student/teacher meta-architecture: independence of the teacher, EMA, gradients, losses on a tiny ViT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain.masking import MaskingGenerator, collate_crops
from pretrain.meta_arch import SSLMetaArch
from pretrain.models.vit import build_vit


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _meta(**kw):
    torch.manual_seed(0)
    bb = build_vit("vit_tiny", patch_size=4, img_size=16, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.1)
    return SSLMetaArch(bb, dino_prototypes=40, ibot_prototypes=30, head_hidden_dim=32, head_bottleneck_dim=16, **kw)


def _batch(n=4, n_local=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = [{"global_crops": [torch.randn(3, 16, 16, generator=g) for _ in range(2)],
                "local_crops": [torch.randn(3, 8, 8, generator=g) for _ in range(n_local)]} for _ in range(n)]
    return collate_crops(samples, n_tokens=16, mask_generator=MaskingGenerator((4, 4), max_num_patches=8),
                         rng=np.random.default_rng(seed))


def test_teacher_is_an_independent_copy_without_grads():
    meta = _meta()
    s_params = dict(meta.student.named_parameters())
    t_params = dict(meta.teacher.named_parameters())
    assert s_params.keys() == t_params.keys()
    assert meta.teacher is not meta.student
    assert meta.teacher["backbone"] is not meta.student["backbone"]
    assert not ({p.data_ptr() for p in s_params.values()} & {p.data_ptr() for p in t_params.values()})
    assert all(torch.equal(s_params[k], t_params[k]) for k in s_params)  # starts equal
    assert not any(p.requires_grad for p in t_params.values())
    meta.train()
    assert meta.student.training and not meta.teacher.training


@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_forward_backward_reaches_student_only(separate, centering):
    meta = _meta(ibot_separate_head=separate, centering=centering)
    loss, metrics = meta(_batch(), teacher_temp=0.04)
    assert loss.ndim == 0 and torch.isfinite(loss)
    for k in ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "teacher_entropy",
              "teacher_student_kl"):
        assert torch.isfinite(metrics[k]), k
    assert metrics["ibot_loss"] > 0
    loss.backward()
    assert all(p.grad is None for p in meta.teacher.parameters())
    assert meta.student["backbone"].mask_token.grad is not None  # iBOT reaches the mask token
    assert all(p.grad is not None for n, p in meta.student.named_parameters()), "a student parameter got no grad"


def test_total_loss_is_the_weighted_sum_of_parts():
    meta = _meta(dino_weight=1.0, ibot_weight=0.5, koleo_weight=0.1)
    loss, m = meta(_batch(), teacher_temp=0.04)
    expected = m["dino_local_crops_loss"] + m["dino_global_crops_loss"] + 0.5 * m["ibot_loss"] + 0.1 * m["koleo_loss"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_ibot_off_needs_no_masks():
    meta = _meta(ibot_weight=0.0)
    batch = _batch()
    batch.pop("masks"), batch.pop("mask_indices"), batch.pop("masks_weight")
    loss, m = meta(batch, teacher_temp=0.04)
    assert m["ibot_loss"].item() == 0.0 and torch.isfinite(loss)


def test_centers_update_with_softmax_centering_only():
    meta = _meta()
    meta(_batch(), teacher_temp=0.04)
    assert meta.dino_loss.center.abs().sum() > 0 and meta.ibot_loss.center.abs().sum() > 0
    sk = _meta(centering="sinkhorn_knopp")
    sk(_batch(), teacher_temp=0.04)
    assert sk.dino_loss.center.abs().sum() == 0


def test_ema_update():
    meta = _meta()
    with torch.no_grad():
        for p in meta.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in meta.teacher.parameters()]
    meta.update_teacher(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, meta.teacher.parameters()))
    meta.update_teacher(0.75)
    for b, t, s in zip(before, meta.teacher.parameters(), meta.student.parameters()):
        assert torch.allclose(t, 0.75 * b + 0.25 * s, atol=1e-6)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    meta = _meta()
    opt = torch.optim.AdamW(meta.student.parameters(), lr=1e-3)
    batch = _batch()
    torch.manual_seed(1)
    first = None
    for _ in range(15):
        loss, _ = meta(batch, teacher_temp=0.04)
        opt.zero_grad()
        loss.backward()
        opt.step()
        meta.update_teacher(0.9)
        first = first if first is not None else loss.item()
    assert loss.item() < first


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_compiled_loss_kernels_match_eager_without_recompiling_each_step(centering):
    """`compile_losses` gives the eager losses, gradients and centres, and neither the teacher temperature
    (warmed up every step) nor the count of masked patches (new every step) recompiles after the first
    change."""
    from torch._dynamo.utils import counters

    eager, compiled = (_meta(centering=centering, ibot_separate_head=True) for _ in range(2))
    compiled.compile_losses()
    graphs = []
    for step in range(4):
        batch, temp = _batch(seed=step), 0.04 + 0.01 * step
        results = []
        for meta in (eager, compiled):
            torch.manual_seed(step)  # the same stochastic-depth draws
            loss, metrics = meta(batch, temp)
            loss.backward()
            results.append((loss, metrics, meta.student["ibot_head"].last_layer.weight_v.grad.clone()))
            meta.zero_grad(set_to_none=True)
        (le, me, ge), (lc, mc, gc) = results
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mc["ibot_loss"], me["ibot_loss"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-6)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0, "nothing was compiled"
    assert graphs[1] == graphs[2] == graphs[3], f"recompiled during steady steps: {graphs}"
    torch.testing.assert_close(compiled.ibot_loss.center, eager.ibot_loss.center)


class _HostReads(TorchDispatchMode):
    """Records the ops that, on a GPU, make the host wait for the device (a value read back, an output
    whose size depends on the data) or copy host data to it (a tensor built from Python values)."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive",
               "lift_fresh", "lift_fresh_copy", "is_nonzero", "equal"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket.__name__ in self.SYNCING:
            self.seen.append(func._overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_a_training_step_never_waits_for_the_device(centering):
    """Forward, backward, clipping and the EMA read nothing back and copy nothing from the host: each would
    stall a GPU step until the device drains (the optimizer is left out: on CUDA it runs fused, without
    the CPU AdamW's per-parameter step counts on the host)."""
    meta = _meta(centering=centering, ibot_separate_head=True)
    batch = _batch()
    reads = _HostReads()
    with reads:
        loss, metrics = meta(batch, 0.04)
        loss.backward()
        for name in meta.student.keys():
            torch.nn.utils.clip_grad_norm_(meta.student[name].parameters(), 3.0)
        meta.update_teacher(0.99)
    assert reads.seen == []
    assert torch.isfinite(loss) and loss > 0
    # The mode does see such reads: the metrics are read once, by the loop, after the step.
    with reads:
        float(metrics["total_loss"])
    assert reads.seen == ["_local_scalar_dense"]


def test_prototypes_are_frozen_by_their_learning_rate_while_adamw_sees_their_gradients():
    """DINOv2 freezes the last layer with a zero learning rate: the prototypes stay bitwise while frozen,
    and AdamW's moments take their real gradients meanwhile. (Zeroed gradients, DINOv1's way under Adam,
    leave the second moment at 0 and make the first steps after the freeze several times too large.)"""
    import contextlib

    from pretrain.loop import build_optimizer, lr_and_schedules, optimizer_step
    from pretrain.param_groups import param_groups
    from pretrain_helpers import tiny_config

    cfg = tiny_config(total_iters=5, warmup_iters=0, freeze_last_layer_iters=3)
    meta = _meta()
    optimizer = build_optimizer(param_groups(meta.student, num_layers=2), cfg)
    _, sched = lr_and_schedules(cfg, 4)
    last = {n: p for n, p in meta.student.named_parameters() if "last_layer" in n and p.requires_grad}
    mlp = meta.student["dino_head"].mlp[0].weight
    start = {n: p.detach().clone() for n, p in last.items()}
    mlp_start = mlp.detach().clone()

    def step(it):
        optimizer_step(meta, optimizer, _batch(seed=it), sched.at(it), cfg=cfg, autocast=contextlib.nullcontext(),
                       clip_modules=[meta.student[k] for k in meta.student.keys()], update_ema=meta.update_teacher)

    for it in range(3):
        step(it)
    assert last and all(torch.equal(p, start[n]) for n, p in last.items())  # frozen, bitwise
    assert not torch.equal(mlp, mlp_start)  # while the rest of the head trains
    for n, p in last.items():
        assert optimizer.state[p]["exp_avg_sq"].abs().sum() > 0, n  # AdamW saw the real gradients
    step(3)
    assert all(not torch.equal(p, start[n]) for n, p in last.items())  # unfrozen
