"""The ViT backbone: DINOv2 output contract, masks, multi-crop lists, pos-embed resampling, stochastic depth."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.layers import Block, drop_add_residual_subset, swiglu_hidden
from pretrain.models import ARCHS, build_vit, vit_config, vit_forward_flops

torch.set_num_threads(1)

KEYS = {"x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "masks"}


def tiny(**kw):
    torch.manual_seed(0)
    return build_vit("vit_tiny", **{"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 56, **kw}).eval()


@pytest.mark.parametrize("patch,regs", [(14, 0), (16, 4)])
def test_forward_features_keys_and_shapes(patch, regs):
    m = tiny(patch_size=patch, num_register_tokens=regs, img_size=4 * patch)
    x = torch.randn(3, 3, 3 * patch, 5 * patch)  # not the training grid, not square
    with torch.no_grad():
        out = m.forward_features(x)
    assert set(out) == KEYS
    assert out["x_norm_clstoken"].shape == (3, 64)
    assert out["x_norm_regtokens"].shape == (3, regs, 64)
    assert out["x_norm_patchtokens"].shape == (3, 15, 64)
    assert out["x_prenorm"].shape == (3, 1 + regs + 15, 64)
    assert out["masks"] is None
    # forward() is DINOv2's: the CLS embedding, or the dict when is_training
    with torch.no_grad():
        assert torch.equal(m(x), out["x_norm_clstoken"])
        assert set(m(x, is_training=True)) == KEYS


def test_rejects_input_not_multiple_of_patch():
    with pytest.raises(ValueError, match="multiple of the patch"):
        tiny()(torch.randn(1, 3, 50, 56))


def test_masks_replace_patch_tokens_by_mask_token():
    m = tiny()
    with torch.no_grad():
        m.mask_token.normal_()
    a, b = torch.randn(2, 3, 56, 56).chunk(2)
    all_masked = torch.ones(1, 16, dtype=torch.bool)
    with torch.no_grad():
        oa = m.forward_features(a, masks=all_masked)
        ob = m.forward_features(b, masks=all_masked)
        oc = m.forward_features(a)
    # Every patch replaced: the image content no longer matters...
    torch.testing.assert_close(oa["x_prenorm"], ob["x_prenorm"])
    assert oa["masks"] is all_masked
    # ...and unmasked it does.
    assert not torch.allclose(oa["x_prenorm"], oc["x_prenorm"])
    # Gradient reaches the mask token only when masks are used.
    m.train()
    # (not a sum of LayerNorm outputs: with unit gain and zero bias that is constant, its gradient zero)
    m.forward_features(a, masks=all_masked)["x_prenorm"][:, 0].sum().backward()
    assert m.mask_token.grad is not None and m.mask_token.grad.abs().sum() > 0


def test_list_input_equals_separate_calls():
    m = tiny(num_register_tokens=2)
    g = torch.randn(2, 3, 56, 56)
    loc = torch.randn(4, 3, 28, 28)
    masks = torch.rand(2, 16) < 0.5
    with torch.no_grad():
        outs = m.forward_features([g, loc], masks=[masks, None])
        ref_g = m.forward_features(g, masks=masks)
        ref_l = m.forward_features(loc)
    assert isinstance(outs, list) and len(outs) == 2
    for out, ref in ((outs[0], ref_g), (outs[1], ref_l)):
        for k in ("x_norm_clstoken", "x_norm_patchtokens", "x_norm_regtokens", "x_prenorm"):
            torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-5)
    assert outs[0]["masks"] is masks and outs[1]["masks"] is None


def test_pos_embed_native_and_resampled():
    m = tiny()  # grid 4x4, plain model: offset 0.1, no antialias
    x = torch.zeros(1, 17, 64)
    assert m.interpolate_pos_encoding(x, 56, 56) is m.pos_embed
    assert m.interpolate_offset == 0.1 and m.interpolate_antialias is False
    r = tiny(num_register_tokens=4)  # register models: exact size, antialiased
    assert r.interpolate_offset == 0.0 and r.interpolate_antialias is True
    pe = r.interpolate_pos_encoding(torch.zeros(1, 1 + 6 * 3, 64), 6 * 14, 3 * 14)
    grid = r.pos_embed[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 3), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 18, 64)
    torch.testing.assert_close(pe[:, 1:], want)
    torch.testing.assert_close(pe[:, :1], r.pos_embed[:, :1])


def test_subset_stochastic_depth_touches_only_the_subset():
    torch.manual_seed(0)
    x = torch.randn(10, 5, 8)
    out = drop_add_residual_subset(x, lambda t: torch.ones_like(t), rate=0.4)
    changed = (out != x).flatten(1).any(1)
    assert int(changed.sum()) == 6  # max(int(10 * 0.6), 1)
    # kept samples get the branch scaled by B/subset, so the expectation is x + branch
    torch.testing.assert_close(out[changed], x[changed] + 10 / 6)
    torch.testing.assert_close(out[~changed], x[~changed])


def test_block_drop_path_only_in_training():
    torch.manual_seed(0)
    blk = Block(32, 2, 64, init_values=1.0, drop_path=0.5)
    x = torch.randn(16, 5, 32)
    blk.eval()
    ref = x + blk._attn_branch(x)
    ref = ref + blk._ffn_branch(ref)
    torch.testing.assert_close(blk(x), ref)
    blk.train()
    out = blk(x)
    # With rate 0.5 the subset path runs each branch on 8 of the 16 samples: some rows must equal eval's,
    # some must differ (the branch on a sample is either absent or scaled by 2).
    assert not torch.allclose(out, ref)
    assert out.shape == x.shape


def test_drop_path_rate_schedule():
    m = build_vit("vit_tiny", depth=4, drop_path_rate=0.3, drop_path_uniform=False)
    assert [round(b.drop_path_rate, 3) for b in m.blocks] == [0.0, 0.1, 0.2, 0.3]
    m = build_vit("vit_tiny", depth=4, drop_path_rate=0.3)
    assert all(b.drop_path_rate == 0.3 for b in m.blocks)


def test_presets_sizes():
    assert swiglu_hidden(1536, 4.0) == 4096  # ViT-g's official SwiGLU width
    counts = {}
    for arch in ARCHS:
        with torch.device("meta"):
            m = build_vit(arch, img_size=224)
        counts[arch] = sum(p.numel() for p in m.parameters()) / 1e6
    assert 21 < counts["vit_small"] < 23
    assert 85 < counts["vit_base"] < 88
    assert 302 < counts["vit_large"] < 306
    assert 629 < counts["vit_huge"] < 634  # timm's ViT-H/14: 630.8M
    with torch.device("meta"):
        g = build_vit("vit_giant2", ffn_layer="swiglu", img_size=518)
    assert 1130 < sum(p.numel() for p in g.parameters()) / 1e6 < 1140  # dinov2_vitg14: 1.136B
    assert g.blocks[0].mlp.w12.out_features == 2 * 4096
    # FLOPs per image at 224 match the published figures (timm: ViT-H/14 167.4 GMACs)
    assert abs(vit_forward_flops(vit_config("vit_huge", patch_size=14), 224) / 2e9 - 167.4) < 0.5
    with pytest.raises(ValueError, match="unknown ViT architecture"):
        build_vit("vit_enormous")


@pytest.mark.cuda
def test_xformers_and_sdpa_agree_on_cuda(monkeypatch):
    pytest.importorskip("xformers")
    m = tiny().cuda()
    x = torch.randn(4, 3, 56, 56, device="cuda")
    with torch.no_grad():
        a = m(x)
        monkeypatch.setenv("LVDFLOW_DISABLE_XFORMERS", "1")
        b = m(x)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_xformers_is_not_traced_by_torch_compile(monkeypatch):
    import importlib
    from types import SimpleNamespace

    attn_mod = importlib.import_module("pretrain.layers.attention")  # the package exports a function of that name

    monkeypatch.setattr(attn_mod, "xformers_available", lambda: True)
    cuda_q = SimpleNamespace(is_cuda=True)
    assert attn_mod.use_xformers(cuda_q) and not attn_mod.use_xformers(SimpleNamespace(is_cuda=False))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # as while Dynamo traces a block
    assert not attn_mod.use_xformers(cuda_q)


@pytest.mark.cuda
def test_a_training_block_compiles_to_one_graph_on_cuda():
    """Regional compilation only pays if each block is one graph: on an H100 the compiled trainer's blocks
    ran eagerly with xformers installed (its kernel breaks graphs). Whatever is installed, none here."""
    blk = Block(64, 4, 256, ffn_layer="swiglu", init_values=1e-5, drop_path=0.4).cuda().train()
    xs = [torch.randn(8, 17, 64, device="cuda"), torch.randn(16, 5, 64, device="cuda")]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ex = torch._dynamo.explain(blk)(xs)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons


def test_get_intermediate_layers():
    m = tiny(depth=3, num_register_tokens=2)
    x = torch.randn(2, 3, 56, 28)
    with torch.no_grad():
        outs = m.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True)
        last = m.forward_features(x)
    assert len(outs) == 2 and outs[0][0].shape == (2, 64, 4, 2) and outs[0][1].shape == (2, 64)
    # the last block, normed, is forward_features' output (registers excluded from the patch grid)
    torch.testing.assert_close(outs[1][0].flatten(2).transpose(1, 2), last["x_norm_patchtokens"])
    torch.testing.assert_close(outs[1][1], last["x_norm_clstoken"])
    with torch.no_grad():
        picked = m.get_intermediate_layers(x, n=[0], norm=False)
    assert picked[0].shape == (2, 8, 64)


def test_init_weights_covers_every_parameter():
    # FSDP2 pattern: build on meta, materialise uninitialised memory, then init_weights().
    with torch.device("meta"):
        m = build_vit("vit_tiny", depth=2, num_register_tokens=2, ffn_layer="swiglu", init_values=1e-5)
    m = m.to_empty(device="cpu")
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float("nan"))
    m.init_weights()
    for name, p in m.named_parameters():
        assert torch.isfinite(p).all(), name
    assert torch.all(m.blocks[0].ls1.gamma == 1e-5) and torch.all(m.mask_token == 0)


@pytest.mark.cuda
def test_bf16_gelu_epilogue_matches_exact_gelu_and_survives_compile():
    """The cuBLASLt fc1+GELU(tanh) epilogue (bf16 inference) against the exact erf GELU in float32: the
    same block outputs up to bf16 rounding, eager and compiled; float32 inputs keep the exact path."""
    from pretrain.layers import Mlp, use_gelu_epilogue

    torch.manual_seed(0)
    mlp = Mlp(256, 1024).cuda()
    x = torch.randn(4, 50, 256, device="cuda")
    with torch.no_grad():
        ref = mlp(x)  # float32, exact GELU
        assert use_gelu_epilogue(mlp) == 1
        torch.testing.assert_close(mlp(x), ref)  # float32 input: the flag changes nothing
        fast = mlp.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        eager = fast(xb)
        compiled = torch.compile(fast)(xb)
    rel = ((eager.float() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
    m = tiny().cuda().eval()
    y = torch.randn(8, 3, 56, 56, device="cuda")
    with torch.no_grad():
        want = m.forward_features(y)["x_norm_clstoken"]
        use_gelu_epilogue(m)
        got = m.to(torch.bfloat16).forward_features(y.to(torch.bfloat16))["x_norm_clstoken"].float()
    assert F.cosine_similarity(got, want).min() > 0.99


def test_patch_embedding_as_matmul_equals_the_convolution():
    from pretrain.layers import PatchEmbed

    torch.manual_seed(0)
    pe = PatchEmbed(patch_size=14, in_chans=3, embed_dim=32)
    x = torch.randn(2, 3, 28, 42)  # not square: rows and columns must not be swapped
    want = pe(x)
    pe.as_matmul = True
    got = pe(x)
    assert got.shape == want.shape == (2, 6, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        pe(torch.randn(1, 3, 30, 28))


@pytest.mark.parametrize("layerscale", [True, False])
def test_folded_ffn_residual_equals_the_block(layerscale):
    """x + ls2(fc2(h)) as one accumulating GEMM with gamma folded into fc2: the same outputs as the plain
    block in float32, eager and compiled; training mode and the SwiGLU FFN keep the plain path."""
    torch.manual_seed(0)
    blk = Block(64, 4, 256, init_values=1e-5 if layerscale else None).eval()
    with torch.no_grad():
        if layerscale:
            blk.ls2.gamma.uniform_(0.5, 1.5)  # far from the init, so a missing gain would show
        blk.mlp.fc2.bias.normal_()
    x = torch.randn(3, 10, 64)
    with torch.no_grad():
        want = blk(x)
        assert blk.fold_ffn_residual()
        torch.testing.assert_close(blk(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.compile(blk)(x), want, rtol=1e-5, atol=1e-5)
        blk.mlp.fc2.weight.mul_(2)  # the fold is a copy: the plain path sees the change, the folded one not
        assert not torch.allclose(blk.train()(x), blk.eval()(x))
        assert not blk.fold_ffn_residual(False) and blk.folded_fc2 is None
    assert not Block(64, 4, 256, ffn_layer="swiglu").fold_ffn_residual()
