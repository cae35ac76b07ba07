"""Checkpoint interop: official DINOv2 layouts (flat, reg4, FSDP chunks, training exports), timm
safetensors, this project's format, export back to the official layout, and strict key matching."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from lvdflow.errors import UserError
from pretrain.models import build_vit, export_official, load_backbone, save_backbone

torch.set_num_threads(1)
D, DEPTH, HEADS, PATCH, GRID = 128, 2, 2, 14, 4


def official_state_dict(regs=0, swiglu=False, seed=0):
    """A fake hub checkpoint, written from the published key names and shapes (not from our modules)."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "cls_token": t(1, 1, D),
        "pos_embed": t(1, 1 + GRID * GRID, D),
        "mask_token": t(1, D),
        "patch_embed.proj.weight": t(D, 3, PATCH, PATCH),
        "patch_embed.proj.bias": t(D),
        "norm.weight": 1 + t(D),
        "norm.bias": t(D),
    }
    if regs:
        sd["register_tokens"] = t(1, regs, D)
    hidden = 4 * D
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd |= {
            b + "norm1.weight": 1 + t(D), b + "norm1.bias": t(D),
            b + "attn.qkv.weight": t(3 * D, D), b + "attn.qkv.bias": t(3 * D),
            b + "attn.proj.weight": t(D, D), b + "attn.proj.bias": t(D),
            b + "ls1.gamma": 1 + t(D), b + "ls2.gamma": 1 + t(D),
            b + "norm2.weight": 1 + t(D), b + "norm2.bias": t(D),
        }  # fmt: skip
        if swiglu:
            h = (int(hidden * 2 / 3) + 7) // 8 * 8
            sd |= {b + "mlp.w12.weight": t(2 * h, D), b + "mlp.w12.bias": t(2 * h),
                   b + "mlp.w3.weight": t(D, h), b + "mlp.w3.bias": t(D)}  # fmt: skip
        else:
            sd |= {b + "mlp.fc1.weight": t(hidden, D), b + "mlp.fc1.bias": t(hidden),
                   b + "mlp.fc2.weight": t(D, hidden), b + "mlp.fc2.bias": t(D)}  # fmt: skip
    return sd


def features(model, x):
    with torch.no_grad():
        return model.forward_features(x)


def assert_same(a, b):
    for k in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
        assert torch.equal(a[k], b[k]), k


X = torch.randn(2, 3, 98, 70)  # off the stored 56x56 grid: exercises pos-embed resampling


@pytest.mark.parametrize("regs,swiglu", [(0, False), (4, True)])
def test_official_layout_loads_and_roundtrips(tmp_path, regs, swiglu):
    sd = official_state_dict(regs, swiglu)
    torch.save(sd, tmp_path / "hub.pth")
    m = load_backbone(tmp_path / "hub.pth")
    assert not m.training
    c = m.config
    assert (c.embed_dim, c.depth, c.num_heads, c.patch_size, c.img_size) == (D, DEPTH, D // 64, PATCH, GRID * PATCH)
    assert c.num_register_tokens == regs and c.ffn_layer == ("swiglu" if swiglu else "mlp")
    # DINOv2 hub rule: legacy offset for plain models, exact antialiased resize for register models
    assert (c.interpolate_offset, c.interpolate_antialias) == ((0.0, True) if regs else (0.1, False))
    # every tensor landed where its name says
    for k, v in sd.items():
        assert torch.equal(m.state_dict()[k], v), k
    # export -> same keys and values as the hub file -> same outputs after reload
    export_official(m, tmp_path / "export.pth")
    exported = torch.load(tmp_path / "export.pth", weights_only=True)
    assert set(exported) == set(sd)
    assert_same(features(m, X), features(load_backbone(tmp_path / "export.pth"), X))


def test_fsdp_chunked_and_training_export_layouts(tmp_path):
    sd = official_state_dict()
    ref = features(load_backbone_from(tmp_path, sd, "flat.pth"), X)
    # BlockChunk layout: blocks.<chunk>.<global index>.*
    chunked = {(k.replace("blocks.", f"blocks.{int(k.split('.')[1]) // 2}.", 1) if k.startswith("blocks.") else k): v
               for k, v in sd.items()}  # fmt: skip
    assert "blocks.0.1.norm1.weight" in chunked  # chunk 0 holds blocks 0 and 1
    assert_same(ref, features(load_backbone_from(tmp_path, chunked, "chunked.pth"), X))
    # eval export of DINOv2 training: {"teacher": backbone.* + heads}, DDP's module. prefix
    teacher = {f"module.backbone.{k}": v for k, v in sd.items()}
    teacher["module.dino_head.mlp.0.weight"] = torch.zeros(4, D)
    assert_same(ref, features(load_backbone_from(tmp_path, {"teacher": teacher}, "teacher.pth"), X))


def load_backbone_from(tmp_path, obj, name, **kw):
    torch.save(obj, tmp_path / name)
    return load_backbone(tmp_path / name, **kw)


@pytest.mark.parametrize("regs,swiglu", [(0, False), (4, True)])
def test_timm_safetensors(tmp_path, regs, swiglu):
    sd = official_state_dict(regs, swiglu)
    # timm's conversion of the hub weights: no mask token; w12/w3 -> fc1/fc2; register models fold the
    # CLS position into cls_token and drop it from pos_embed (no_embed_class); a classifier head maybe.
    timm = {k.replace("mlp.w12", "mlp.fc1").replace("mlp.w3", "mlp.fc2"): v.clone() for k, v in sd.items() if k != "mask_token"}
    if regs:
        timm["reg_token"] = timm.pop("register_tokens")
        timm["cls_token"] = timm["cls_token"] + timm["pos_embed"][:, :1]
        timm["pos_embed"] = timm["pos_embed"][:, 1:].contiguous()
    timm["head.weight"] = torch.zeros(10, D)
    timm["head.bias"] = torch.zeros(10)
    save_file(timm, str(tmp_path / "model.safetensors"))
    m = load_backbone(tmp_path / "model.safetensors")
    assert m.config.ffn_layer == ("swiglu" if swiglu else "mlp")
    assert (m.config.interpolate_offset, m.config.interpolate_antialias) == (0.0, True)  # timm resamples by size
    x56 = X[:, :, :56, :56].contiguous()
    out = features(m, x56)
    ref56 = features(load_backbone_from(tmp_path, sd, "hub.pth"), x56)
    # At the native grid no resampling happens, so the timm and hub files must give the same numbers.
    for k in ("x_norm_clstoken", "x_norm_patchtokens", "x_norm_regtokens"):
        torch.testing.assert_close(out[k], ref56[k], rtol=0, atol=1e-6)


def test_own_format_keeps_config(tmp_path):
    torch.manual_seed(1)
    m = build_vit("vit_tiny", embed_dim=96, depth=2, num_heads=3, patch_size=16, img_size=64,
                  num_register_tokens=2, ffn_layer="swiglu", interpolate_offset=0.1).eval()  # fmt: skip
    save_backbone(m, tmp_path / "own.pt", extra={"step": 7})
    obj = torch.load(tmp_path / "own.pt", weights_only=True)
    assert obj["format"] == "lvdflow-vit" and obj["extra"] == {"step": 7}
    m2 = load_backbone(tmp_path / "own.pt")
    assert m2.config == m.config  # heads (3, not 96/64) and interpolation survive
    x = torch.randn(2, 3, 80, 48)
    assert_same(features(m, x), features(m2, x))


def test_num_heads_override_and_default(tmp_path):
    torch.save(official_state_dict(), tmp_path / "hub.pth")
    assert load_backbone(tmp_path / "hub.pth").num_heads == 2
    m4 = load_backbone(tmp_path / "hub.pth", num_heads=4)
    assert m4.num_heads == 4 and m4.blocks[0].attn.num_heads == 4
    with pytest.raises(UserError, match="not divisible"):
        load_backbone(tmp_path / "hub.pth", num_heads=3)


def test_strict_matching_rejects_bad_keys(tmp_path):
    sd = official_state_dict()
    extra = dict(sd, **{"blocks.0.attn.surprise": torch.zeros(3)})
    with pytest.raises(UserError, match=r"unexpected keys: blocks\.0\.attn\.surprise"):
        load_backbone_from(tmp_path, extra, "extra.pth")
    missing = {k: v for k, v in sd.items() if k != "blocks.1.ls2.gamma"}
    with pytest.raises(UserError, match=r"missing keys: blocks\.1\.ls2\.gamma"):
        load_backbone_from(tmp_path, missing, "missing.pth")
    wrong = dict(sd, **{"blocks.0.attn.proj.bias": torch.zeros(D + 1)})
    with pytest.raises(UserError, match=r"shape mismatches: blocks\.0\.attn\.proj\.bias"):
        load_backbone_from(tmp_path, wrong, "wrong.pth")
    with pytest.raises(UserError, match="missing 'cls_token'"):
        load_backbone_from(tmp_path, {"foo": torch.zeros(1)}, "foo.pth")
    with pytest.raises(UserError, match="not found"):
        load_backbone(tmp_path / "nope.pth")


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_refuses_pickled_code(tmp_path):
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"cls_token": _Evil()}))
    with pytest.raises(UserError, match="weights_only"):
        load_backbone(tmp_path / "evil.pth")
    torch.save({"cls_token": _Evil()}, tmp_path / "evil_zip.pth")  # torch's own format, same payload
    with pytest.raises(UserError, match="weights_only") as err:
        load_backbone(tmp_path / "evil_zip.pth")
    assert "it holds Python objects, not only tensors (Unsupported global" in str(err.value)
    assert "\n" not in str(err.value) and "add_safe_globals" not in str(err.value)  # the cause, not the advice


@pytest.mark.parametrize("content, cause", [(b"# a README\n", "not a PyTorch checkpoint"),
                                            (b"", "empty or truncated file")])
def test_unreadable_checkpoint_names_its_cause_on_one_line(tmp_path, content, cause):
    (tmp_path / "x.pth").write_bytes(content)
    with pytest.raises(UserError, match=cause) as err:
        load_backbone(tmp_path / "x.pth")
    assert "\n" not in str(err.value)


def test_timm_vit_huge_file_gets_timms_16_heads(tmp_path):
    # timm's ViT-H/14 has 16 heads of 80; width/64 would build 20 heads of 64 from the same tensors, load
    # without error and give other features.
    torch.manual_seed(0)
    ref = build_vit("vit_tiny", embed_dim=1280, depth=1, num_heads=16, patch_size=14, img_size=28).eval()
    timm = {k: v for k, v in ref.state_dict().items() if k != "mask_token"}
    save_file(timm, str(tmp_path / "vit_huge.safetensors"))
    m = load_backbone(tmp_path / "vit_huge.safetensors")
    assert m.config.num_heads == 16
    x = torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(features(m, x)["x_norm_clstoken"], features(ref, x)["x_norm_clstoken"])
    assert load_backbone(tmp_path / "vit_huge.safetensors", num_heads=20).config.num_heads == 20  # given wins
    torch.save(ref.state_dict(), tmp_path / "hub.pth")  # the DINOv2 layout keeps width/64 (its vit_huge2: 20)
    assert load_backbone(tmp_path / "hub.pth").config.num_heads == 20
