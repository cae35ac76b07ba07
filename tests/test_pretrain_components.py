"""Heads, block masking + collate, multi-crop augmentation, schedules and parameter groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lvdflow.errors import UserError
from pretrain.augment import MultiCropAugmentation
from pretrain.heads import DINOHead, build_heads
from pretrain.masking import MaskingGenerator, collate_crops
from pretrain.param_groups import apply_schedules, layer_id, param_groups
from pretrain.schedules import build_schedules, cosine_schedule, scaled_lr


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- heads -------------------------------------------------------------------------------------------
def test_dino_head_shapes_weight_norm_and_official_key_names():
    torch.manual_seed(0)
    head = DINOHead(32, out_dim=50, hidden_dim=24, bottleneck_dim=8)
    out = head(torch.randn(6, 32))
    assert out.shape == (6, 50)
    w = head.last_layer.weight()
    assert torch.allclose(w.norm(dim=1), torch.ones(50), atol=1e-5)  # g = 1 at init: unit prototypes
    # Bottleneck output is L2-normalised and prototypes are unit vectors: logits are cosines.
    assert out.abs().max() <= 1 + 1e-5
    keys = set(head.state_dict())
    assert {"last_layer.weight_g", "last_layer.weight_v", "mlp.0.weight", "mlp.4.bias"} <= keys
    out.sum().backward()
    assert head.last_layer.weight_v.grad is not None and head.mlp[0].weight.grad is not None


def test_separate_or_shared_ibot_head():
    assert set(build_heads(16, dino_prototypes=10, ibot_prototypes=12, hidden_dim=8, bottleneck_dim=4, nlayers=3,
                           ibot_separate_head=False)) == {"dino_head"}
    heads = build_heads(16, dino_prototypes=10, ibot_prototypes=12, hidden_dim=8, bottleneck_dim=4, nlayers=3,
                        ibot_separate_head=True)
    assert heads["ibot_head"].out_dim == 12 and heads["dino_head"].out_dim == 10
    assert heads["ibot_head"].last_layer.weight_v.shape == (12, 4)  # the DINO head's bottleneck by default
    own = build_heads(16, dino_prototypes=10, ibot_prototypes=12, hidden_dim=8, bottleneck_dim=4, nlayers=3,
                      ibot_separate_head=True, ibot_bottleneck_dim=3)  # vitl14: 384 for DINO, 256 for iBOT
    assert own["ibot_head"].last_layer.weight_v.shape == (12, 3) and own["dino_head"].last_layer.weight_v.shape == (10, 4)


# ---- masking -----------------------------------------------------------------------------------------
def _samples(n, g=16, loc=8, n_local=2):
    return [{"global_crops": [torch.randn(3, g, g), torch.randn(3, g, g)],
             "local_crops": [torch.randn(3, loc, loc) for _ in range(n_local)]} for _ in range(n)]


def test_masking_generator_hits_target_counts():
    gen = MaskingGenerator((14, 14), max_num_patches=98)
    rng = np.random.default_rng(0)
    for target in (20, 50, 98):
        counts = [gen(target, rng).sum() for _ in range(20)]
        assert all(c <= target for c in counts)
        assert np.mean(counts) >= 0.8 * target


def test_collate_masks_half_the_images_with_stratified_ratios():
    n = 32  # -> 64 global-crop images, 32 masked
    out = collate_crops(_samples(n), n_tokens=16, mask_generator=MaskingGenerator((4, 4), max_num_patches=8),
                        rng=np.random.default_rng(0))
    assert out["global_crops"].shape == (2 * n, 3, 16, 16)
    assert out["local_crops"].shape == (2 * n, 3, 8, 8)
    masked_per_image = out["masks"].sum(1)
    assert int((masked_per_image > 0).sum()) <= n and int((masked_per_image > 0).sum()) >= n - 4
    assert masked_per_image.max() <= 8  # ratio <= 0.5
    assert out["n_masked_patches"] == int(out["masks"].sum()) == len(out["mask_indices"]) == len(out["masks_weight"])
    # weights: every masked image sums to one
    img_of_token = out["mask_indices"] // 16
    sums = torch.zeros(2 * n).index_add_(0, img_of_token, out["masks_weight"])
    assert torch.allclose(sums[masked_per_image > 0], torch.ones(int((masked_per_image > 0).sum())))


def test_collate_ratios_span_range_and_are_reproducible():
    gen = MaskingGenerator((10, 10), max_num_patches=50)
    a = collate_crops(_samples(50, g=40), n_tokens=100, mask_generator=gen, rng=np.random.default_rng(1))
    b = collate_crops(_samples(50, g=40), n_tokens=100, mask_generator=gen, rng=np.random.default_rng(1))
    assert torch.equal(a["masks"], b["masks"])
    ratios = a["masks"].sum(1).float() / 100
    r = ratios[ratios > 0]
    assert r.min() <= 0.15 and r.max() >= 0.4 and r.max() <= 0.5


# ---- augmentation ------------------------------------------------------------------------------------
def _img():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8), "L")


def test_multicrop_shapes_from_grayscale_input():
    aug = MultiCropAugmentation(local_crops_number=3, global_crops_size=32, local_crops_size=16)
    out = aug(_img())
    assert [t.shape for t in out["global_crops"]] == [(3, 32, 32)] * 2
    assert [t.shape for t in out["local_crops"]] == [(3, 16, 16)] * 3
    assert all(t.dtype == torch.uint8 for t in out["global_crops"] + out["local_crops"])  # normalised on the device


def test_training_crops_are_normalised_on_the_device_as_torchvision_would():
    """Workers send uint8 crops and `to_device` normalises the batch where the model runs: the model must
    receive what the per-crop float conversion and ImageNet normalisation would have given, and a model
    handed raw crops must say so."""
    from torchvision.transforms import v2

    from pretrain.data import make_batch
    from pretrain.loop import to_device
    from pretrain.normalise import IMAGENET_MEAN, IMAGENET_STD, require_normalised

    aug = MultiCropAugmentation(local_crops_number=2, global_crops_size=32, local_crops_size=16)
    raw = make_batch([_img(), _img()], seed=5, augmentation=aug, patch_size=8, mask_probability=0.5,
                     mask_ratio=(0.1, 0.5))
    assert raw["global_crops"].dtype == raw["local_crops"].dtype == torch.uint8
    with pytest.raises(TypeError, match="normalise the crops first"):
        require_normalised(raw)
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    moved = to_device(raw, torch.device("cpu"))
    require_normalised(moved)
    for key in ("global_crops", "local_crops"):
        assert moved[key].dtype == torch.float32
        torch.testing.assert_close(moved[key], torch.stack([reference(c) for c in raw[key]]), rtol=0, atol=1e-6)
    assert torch.equal(moved["masks"], raw["masks"])
    assert torch.equal(raw["global_crops"], make_batch([_img(), _img()], seed=5, augmentation=aug, patch_size=8,
                                                       mask_probability=0.5, mask_ratio=(0.1, 0.5))["global_crops"])


def _blur_p(compose):
    from torchvision.transforms import v2

    for t in compose.transforms:
        if isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.GaussianBlur):
            return t.p
    raise AssertionError("no blur")


def test_blur_probabilities_paper_default_and_official_inverted():
    paper = MultiCropAugmentation(local_crops_number=1, global_crops_size=32, local_crops_size=16)
    official = MultiCropAugmentation(local_crops_number=1, global_crops_size=32, local_crops_size=16,
                                     blur_probabilities="official")
    assert (_blur_p(paper.global1), _blur_p(paper.global2), _blur_p(paper.local)) == (1.0, 0.1, 0.5)
    assert (_blur_p(official.global1), _blur_p(official.global2), _blur_p(official.local)) == (0.0, 0.9, 0.5)
    with pytest.raises(ValueError, match="blur_probabilities"):
        MultiCropAugmentation(blur_probabilities="bogus")


def _blur_sigma(compose) -> list:
    from torchvision.transforms import v2

    return [list(t.transforms[0].sigma) for t in compose.transforms
            if isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.GaussianBlur)]


def test_blur_sigma_defaults_to_the_papers_and_reaches_every_crop():
    from pretrain.config import TrainConfig
    from pretrain.train import build_augmentation

    paper = MultiCropAugmentation(local_crops_number=1, global_crops_size=32, local_crops_size=16)
    assert _blur_sigma(paper.global1) == _blur_sigma(paper.local) == [[0.1, 2.0]]
    cfg = TrainConfig(global_crops_size=32, local_crops_size=16, local_crops_number=1, blur_sigma=[0.01, 0.2])
    small = build_augmentation(cfg)
    assert [_blur_sigma(c) for c in (small.global1, small.global2, small.local)] == [[[0.01, 0.2]]] * 3
    with pytest.raises(ValueError, match="blur_sigma"):
        MultiCropAugmentation(blur_sigma=(2.0, 0.1))
    with pytest.raises(UserError, match="blur_sigma"):
        TrainConfig(blur_sigma=[0.0, 1.0]).validate()


def test_augmentation_is_reproducible_under_a_seed():
    aug = MultiCropAugmentation(local_crops_number=2, global_crops_size=32, local_crops_size=16)
    torch.manual_seed(3)
    a = aug(_img())
    torch.manual_seed(3)
    b = aug(_img())
    assert all(torch.equal(x, y) for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"]))


# ---- schedules ---------------------------------------------------------------------------------------
def test_cosine_schedule_warmup_and_end():
    s = cosine_schedule(1.0, 0.1, total_iters=100, warmup_iters=10, start_warmup_value=0.0)
    assert len(s) == 100 and s[0] == 0.0 and s[10] == pytest.approx(1.0)
    assert np.all(np.diff(s[:11]) > 0) and np.all(np.diff(s[10:]) <= 0)
    assert s[-1] == pytest.approx(0.1, abs=1e-3)
    assert np.all(cosine_schedule(1.0, 0.0, 20, 0, freeze_iters=5)[:5] == 0)


def test_all_training_schedules():
    sch = build_schedules(total_iters=100, lr=1e-3, min_lr=1e-6, warmup_iters=10, weight_decay=0.04,
                          weight_decay_end=0.4, momentum_teacher=0.992, final_momentum_teacher=1.0,
                          teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_iters=30,
                          freeze_last_layer_iters=5)
    assert sch.wd[0] == pytest.approx(0.04) and sch.wd[-1] == pytest.approx(0.4, abs=1e-3)
    assert sch.momentum[0] == pytest.approx(0.992) and sch.momentum[-1] == pytest.approx(1.0, abs=1e-5)
    assert sch.teacher_temp[0] == pytest.approx(0.04) and sch.teacher_temp[30:].min() == pytest.approx(0.07)
    assert np.all(sch.last_layer_lr[:5] == 0) and sch.last_layer_lr[5] == sch.lr[5] > 0
    assert sch.at(10_000)["momentum"] == pytest.approx(sch.momentum[-1])  # past the end: last value


def test_sqrt_batch_scaling():
    assert scaled_lr(4e-3, 1024) == pytest.approx(4e-3)
    assert scaled_lr(4e-3, 256) == pytest.approx(2e-3)


# ---- parameter groups --------------------------------------------------------------------------------
def _student():
    from pretrain.models.vit import build_vit

    heads = build_heads(32, dino_prototypes=10, ibot_prototypes=10, hidden_dim=16, bottleneck_dim=8, nlayers=3,
                        ibot_separate_head=False)
    return torch.nn.ModuleDict({"backbone": build_vit("vit_tiny", patch_size=4, img_size=16, embed_dim=32, depth=3,
                                                      num_heads=2), **heads})


def test_layer_ids():
    assert layer_id("backbone.pos_embed", 12) == 0
    assert layer_id("backbone.patch_embed.proj.weight", 12) == 0
    assert layer_id("backbone.blocks.0.attn.qkv.weight", 12) == 1
    assert layer_id("backbone.blocks.11.mlp.fc1.weight", 12) == 12
    assert layer_id("backbone.norm.weight", 12) == 13


def test_param_groups_decay_masks_and_multipliers():
    model = _student()
    groups = param_groups(model, num_layers=3, layer_decay=0.5, patch_embed_lr_mult=0.2)
    by_name = {n: g for g in groups for n in g["names"]}
    assert set(by_name) == {n for n, _ in model.named_parameters()}
    for name in ("backbone.pos_embed", "backbone.cls_token", "backbone.mask_token", "backbone.blocks.0.norm1.weight",
                 "backbone.blocks.0.attn.qkv.bias", "backbone.blocks.0.ls1.gamma", "dino_head.mlp.0.bias"):
        assert by_name[name]["wd_multiplier"] == 0.0, name
    for name in ("backbone.blocks.0.attn.qkv.weight", "dino_head.mlp.0.weight", "backbone.patch_embed.proj.weight"):
        assert by_name[name]["wd_multiplier"] == 1.0, name
    assert by_name["backbone.blocks.2.mlp.fc1.weight"]["lr_multiplier"] == pytest.approx(0.5)
    assert by_name["backbone.blocks.0.mlp.fc1.weight"]["lr_multiplier"] == pytest.approx(0.125)
    assert by_name["backbone.patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.5 ** 4 * 0.2)
    assert by_name["dino_head.mlp.0.weight"]["lr_multiplier"] == 1.0
    assert by_name["dino_head.last_layer.weight_v"]["is_last_layer"]
    assert not by_name["dino_head.mlp.0.weight"]["is_last_layer"]
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups])
    apply_schedules(opt, lr=1.0, last_layer_lr=0.0, wd=0.1)
    for g in opt.param_groups:
        assert g["lr"] == (0.0 if g["is_last_layer"] else g["lr_multiplier"])
        assert g["weight_decay"] == pytest.approx(0.1 * g["wd_multiplier"])


def test_norm_last_layer_freezes_the_prototype_norm():
    head = DINOHead(16, out_dim=10, hidden_dim=8, bottleneck_dim=4, norm_last_layer=True)
    assert not head.last_layer.weight_g.requires_grad and head.last_layer.weight_v.requires_grad
    head(torch.randn(3, 16)).sum().backward()
    assert head.last_layer.weight_g.grad is None
    assert "dino_head.last_layer.weight_g" not in {
        n for g in param_groups(torch.nn.ModuleDict({"dino_head": head}), num_layers=1) for n in g["names"]}
