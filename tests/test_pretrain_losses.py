"""DINO / iBOT / KoLeo losses: known values, centering, Sinkhorn-Knopp, buffers under device moves."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lvdflow.net import free_port
from pretrain.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss, sinkhorn_knopp


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_dino_loss_known_value_uniform_student():
    loss = DINOLoss(4)
    student = torch.zeros(2, 3, 4)  # two crops of three images, uniform predictions
    teacher = F.one_hot(torch.tensor([0, 1, 2]), 4).float()
    assert loss(student, teacher).item() == pytest.approx(2 * math.log(4), rel=1e-6)


def test_dino_loss_matches_explicit_cross_entropy():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.softmax(torch.randn(5, 7), -1)
    expected = -(t * torch.log_softmax(s / 0.1, -1)).sum(-1).mean()
    assert DINOLoss(7)(s, t).item() == pytest.approx(expected.item(), rel=1e-6)
    assert DINOLoss(7)(s.bfloat16(), t).item() == pytest.approx(expected.item(), rel=2e-2)  # upcast inside


def test_dino_loss_against_summed_views_is_the_sum_over_views():
    # What meta_arch relies on for the local crops: one term against t1 + t2 equals the two terms.
    torch.manual_seed(0)
    s, t1, t2 = torch.randn(3, 5, 7), torch.softmax(torch.randn(5, 7), -1), torch.softmax(torch.randn(5, 7), -1)
    loss = DINOLoss(7)
    torch.testing.assert_close(loss(s, t1 + t2), loss(s, t1) + loss(s, t2))
    assert loss(s, t1) > 0


def test_softmax_centering_uses_then_updates_center():
    loss = DINOLoss(3, center_momentum=0.9)
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    probs = loss.softmax_center_teacher(logits, 0.5)
    assert torch.allclose(probs, torch.softmax(logits / 0.5, -1))  # centre still zero
    loss.update_center(logits)
    assert torch.allclose(loss.center, 0.1 * logits.mean(0, keepdim=True))
    probs2 = loss.softmax_center_teacher(logits, 0.5)
    assert torch.allclose(probs2, torch.softmax((logits - loss.center) / 0.5, -1))
    # The one-pass form: targets with the centre from before, then the same EMA step.
    other = DINOLoss(3, center_momentum=0.9)
    other.load_state_dict(loss.state_dict())
    probs3 = other.softmax_center_teacher(logits, 0.5, update_center=True)
    assert torch.equal(probs3, probs2)
    loss.update_center(logits)
    torch.testing.assert_close(other.center, loss.center)
    # No rows at all: the centre is kept (decided on the device, without reading a value back).
    kept = other.center.clone()
    other.softmax_center_teacher(logits[:0], 0.5, update_center=True)
    assert torch.equal(other.center, kept)


def test_sinkhorn_knopp_is_doubly_stochastic():
    torch.manual_seed(0)
    b, k = 32, 8
    logits = torch.randn(b, k) * 3 + torch.arange(k) * 2.0  # strongly unbalanced prototypes
    q = sinkhorn_knopp(logits, teacher_temp=1.0, n_iterations=100)
    assert q.shape == (b, k)
    assert torch.allclose(q.sum(1), torch.ones(b), atol=1e-5)  # each sample is a distribution
    assert torch.allclose(q.sum(0), torch.full((k,), b / k), rtol=1e-3)  # each prototype gets equal mass
    # Three iterations (the DINOv2 setting) already balance far better than a plain softmax.
    q3 = sinkhorn_knopp(logits, 1.0, 3)
    soft = torch.softmax(logits, -1)
    assert (q3.sum(0) - b / k).abs().max() < 0.5 * (soft.sum(0) - b / k).abs().max()


def test_sinkhorn_knopp_survives_large_logits():
    q = sinkhorn_knopp(torch.tensor([[100.0, -100.0], [50.0, 0.0]]), teacher_temp=0.04)
    assert torch.isfinite(q).all()
    assert torch.allclose(q.sum(1), torch.ones(2))


def test_ibot_loss_weights_each_masked_image_once():
    k = 6
    loss = IBOTPatchLoss(k)
    # Image 0 has 3 masked tokens, image 1 has 1; 4 global-crop images in all.
    weights = torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0])
    student = torch.zeros(4, k)  # uniform -> every token's cross-entropy is log k
    teacher = F.one_hot(torch.tensor([0, 1, 2, 3]), k).float()
    value = loss.forward_masked(student, teacher, weights, n_images=4)
    assert value.item() == pytest.approx(math.log(k) * 2 / 4, rel=1e-6)
    assert loss.forward_masked(student[:0], teacher[:0], weights[:0], 4).item() == 0.0


def test_koleo_known_value_and_small_batch_error():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert KoLeoLoss()(x).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        KoLeoLoss()(torch.randn(1, 4))


def test_koleo_is_scale_invariant_and_finite_in_bf16():
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    k = KoLeoLoss()
    assert k(x).item() == pytest.approx(k(10 * x).item(), rel=1e-5)
    assert torch.isfinite(k(x.bfloat16()))


@pytest.mark.parametrize("cls", [DINOLoss, IBOTPatchLoss])
def test_center_buffer_is_owned_once_and_round_trips(cls):
    loss = cls(5)
    assert [n for n, _ in loss.named_buffers()] == ["center"]
    loss.update_center(torch.randn(4, 5))
    other = cls(5)
    other.load_state_dict(loss.state_dict())
    assert torch.equal(other.center, loss.center)


@pytest.mark.parametrize("cls", [DINOLoss, IBOTPatchLoss])
def test_center_moves_with_to_and_updates_in_place(cls):
    loss = cls(5)
    loss.to(torch.float64)
    assert loss.center.dtype == torch.float64
    loss.update_center(torch.ones(2, 5, dtype=torch.float64))
    assert loss.state_dict()["center"].dtype == torch.float64
    assert torch.allclose(loss.state_dict()["center"], torch.full((1, 5), 0.1, dtype=torch.float64))
    loss.to("meta")
    assert loss.center.device.type == "meta" and loss.state_dict()["center"].device.type == "meta"


@pytest.mark.cuda
@pytest.mark.parametrize("cls", [DINOLoss, IBOTPatchLoss])
def test_center_on_cuda_after_to(cls):
    loss = cls(5).cuda()
    logits = torch.randn(4, 5, device="cuda")
    probs = loss.softmax_center_teacher(logits, 0.07)
    loss.update_center(logits)
    assert probs.device.type == "cuda" and loss.state_dict()["center"].device.type == "cuda"
    assert loss.center.abs().sum() > 0


def _official_sinkhorn(t, temp, n_iter):
    # The plain-domain iteration of DINOv2's `sinkhorn_knopp_teacher` (one process).
    q = torch.exp(t / temp).t()
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(n_iter):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def test_sinkhorn_knopp_matches_plain_iteration_where_that_is_finite():
    torch.manual_seed(1)
    t = torch.randn(20, 12)
    assert torch.allclose(sinkhorn_knopp(t, 0.5, 3), _official_sinkhorn(t, 0.5, 3), atol=1e-5)


def _sinkhorn_rank(rank: int, world: int, port: int, rows: list, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        logits = torch.load(out + ".in")
        lo = sum(rows[:rank])
        mine = logits[lo: lo + rows[rank]]
        q = sinkhorn_knopp(mine, 0.1, 3)
        loss = DINOLoss(logits.shape[1])
        loss.softmax_center_teacher(mine, 0.1, update_center=True)
        torch.save({"q": q, "center": loss.center}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("rows", [[5, 9], [6, 0]])
def test_sinkhorn_and_centre_over_two_ranks_equal_one_process_on_all_rows(tmp_path, rows):
    """Ranks with different row counts (iBOT's masked patches; even none) balance the prototypes over the
    union of their rows, and the centre moves by the mean over all rows, as one process holding them all."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    logits = torch.randn(sum(rows), 8) * 2 + torch.arange(8.0)  # unbalanced prototypes
    out = str(tmp_path / "r")
    torch.save(logits, out + ".in")
    mp.spawn(_sinkhorn_rank, args=(2, free_port(), rows, out), nprocs=2, join=True)
    parts = [torch.load(f"{out}.{r}") for r in range(2)]
    torch.testing.assert_close(torch.cat([p["q"] for p in parts]), sinkhorn_knopp(logits, 0.1, 3))
    single = DINOLoss(8)
    single.update_center(logits)
    for p in parts:
        torch.testing.assert_close(p["center"], single.center)
    assert parts[1]["q"].shape == (rows[1], 8)



@pytest.mark.cuda
@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_compiled_loss_kernels_on_cuda_match_eager(centering):
    """The Triton kernels Inductor makes for the loss passes: same loss and gradients as eager on the GPU,
    from bf16 logits, and no recompilation when the masked count and the temperature change."""
    from torch._dynamo.utils import counters

    def step(loss, rows, temp, seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        t = torch.randn(rows, 4096, device="cuda", generator=g).bfloat16()
        s = torch.randn(rows, 4096, device="cuda", generator=g).bfloat16().requires_grad_()
        targets = (loss.softmax_center_teacher(t, temp, update_center=True) if centering == "centering"
                   else loss.sinkhorn_knopp_teacher(t, temp))
        value = loss.forward_masked(s, targets, torch.full((rows,), 0.5, device="cuda"), n_images=8)
        value.backward()
        return value.detach(), s.grad

    eager, compiled = IBOTPatchLoss(4096).cuda(), IBOTPatchLoss(4096).cuda()
    compiled.compile_math()
    graphs = []
    for i, (rows, temp) in enumerate([(300, 0.04), (257, 0.05), (411, 0.06), (333, 0.07)]):
        (ve, ge), (vc, gc) = step(eager, rows, temp, i), step(compiled, rows, temp, i)
        torch.testing.assert_close(vc, ve, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gc, ge, rtol=2e-2, atol=1e-6)  # bf16 gradients
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[2] == graphs[3] > 0
    torch.testing.assert_close(compiled.center, eager.center)
