"""Learned descriptors: an SSCD-style TorchScript file and a ViT backbone checkpoint, built by the test."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from tests.dedup_helpers import make_pool


class ThumbnailNet(nn.Module):
    """Stands in for SSCD: a colour thumbnail, centred. Copies (resized, recompressed) stay close; it also
    checks it receives SSCD's preprocessing (3 x 320 x 320, ImageNet-normalised floats)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3 or x.shape[2] != 320 or x.shape[3] != 320:
            raise RuntimeError("expected (B, 3, 320, 320)")
        if float(x.min()) >= 0.0:
            raise RuntimeError("expected ImageNet-normalised input (negative values)")
        t = nn.functional.adaptive_avg_pool2d(x, 6).flatten(1)
        return t - t.mean(dim=1, keepdim=True)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("desc")
    return tmp, make_pool(tmp / "pool")


def test_sscd_torchscript_descriptor(pool):
    from curation.dedup.stage import run_dedup

    tmp, fam = pool
    weights = tmp / "tiny_sscd.torchscript.pt"
    torch.jit.script(ThumbnailNet()).save(str(weights))
    m = run_dedup(tmp / "pool", tmp / "out", descriptor="sscd", weights=weights, threshold=0.95, batch_size=4)
    rows = {r["path"]: r for r in pq.read_table(tmp / "out" / "dedup.parquet").to_pylist()}
    assert m["params"]["descriptor"] == "sscd" and m["params"]["size"] == 320
    # a resized recompressed copy is found by a thumbnail; different photos are not merged
    assert rows["astro_small.jpg"]["component"] == rows["astro.png"]["component"]
    assert rows["astro_again.png"]["reason"] == "exact-duplicate"
    comps = {rows[n]["component"] for n in ("astro.png", "cat.png", "coffee.png", "rocket.png", "noise0.png")}
    assert len(comps) == 5


def test_sscd_rejects_a_file_that_is_not_torchscript(tmp_path):
    from curation.dedup.descriptors import make_descriptor
    from lvdflow.errors import UserError

    bad = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match="not a TorchScript model"):
        make_descriptor("sscd", bad)
    with pytest.raises(UserError, match="needs --weights"):
        make_descriptor("sscd", None)


def test_backbone_descriptor_from_a_saved_vit(pool):
    from curation.dedup.stage import run_dedup
    from pretrain.models import build_vit, save_backbone

    tmp, fam = pool
    torch.manual_seed(0)
    vit = build_vit("vit_tiny", depth=1, embed_dim=32, num_heads=2, patch_size=32, img_size=224)
    ckpt = save_backbone(vit, tmp / "vit.pth")
    m = run_dedup(tmp / "pool", tmp / "out_vit", descriptor="backbone", weights=ckpt, threshold=0.999, batch_size=4)
    rows = {r["path"]: r for r in pq.read_table(tmp / "out_vit" / "dedup.parquet").to_pylist()}
    assert m["params"]["descriptor"] == "backbone"
    assert len(rows) == len(fam)
    # a random ViT is no copy detector; the exact duplicate is still caught by the pixel hash
    assert rows["astro_again.png"]["reason"] == "exact-duplicate"
    assert m["index"]["dim"] == 32
