"""kNN and linear evaluation on frozen features, and `lvdflow eval`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lvdflow.errors import UserError
from pretrain.evaluate import evaluate_backbone, evaluate_checkpoint, knn_classify, linear_probe

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_helpers import toy_images  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _clusters(n_per_class=30, n_classes=3, dim=16, noise=0.1, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim))
    y = np.repeat(np.arange(n_classes), n_per_class)
    x = centers[y] + noise * rng.normal(size=(len(y), dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), y


def test_knn_on_separable_features_is_perfect_and_random_labels_are_not():
    x, y = _clusters()
    xt, yt = _clusters(n_per_class=10, seed=0)  # same centres, fresh noise
    res = knn_classify(x, y, xt, yt)
    assert res == {"knn_top1_k10": 100.0, "knn_top1_k20": 100.0}
    shuffled = np.random.default_rng(0).permutation(y)
    assert knn_classify(x, shuffled, xt, yt)["knn_top1_k20"] < 70


def test_knn_vote_is_weighted_by_similarity():
    # One very close neighbour of class 1 outweighs two distant ones of class 0 at T = 0.07.
    train = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], np.float32)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    y = np.array([1, 0, 0])
    q = np.array([[0.99, 0.14]], np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    assert knn_classify(train, y, q, np.array([1]), ks=(3,))["knn_top1_k3"] == 100.0


def test_linear_probe_separates_clusters():
    x, y = _clusters(noise=0.3)
    xt, yt = _clusters(n_per_class=10, noise=0.3, seed=0)
    res = linear_probe(x, y, xt, yt, epochs=50, lrs=(1e-2,), wds=(0.0,))
    assert res["linear_top1"] >= 95


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    imgs = toy_images(24)
    for split, idx in (("train", range(0, 16)), ("test", range(16, 24))):
        for i in idx:
            d = root / split / ("horizontal" if i % 2 == 0 else "vertical")
            d.mkdir(parents=True, exist_ok=True)
            imgs[i].save(d / f"{i}.png")
    return root / "train", root / "test"


def _backbone(tmp_path):
    from pretrain.models.checkpoint import save_backbone
    from pretrain.models.vit import build_vit

    torch.manual_seed(0)
    model = build_vit("vit_tiny", patch_size=4, img_size=16, embed_dim=32, depth=2, num_heads=2, init_values=None)
    return save_backbone(model, tmp_path / "bb.pth"), model


def test_evaluate_backbone_on_image_folders(tmp_path, folders):
    _, model = _backbone(tmp_path)
    res = evaluate_backbone(model, *folders, "knn")
    assert res["n_train"] == 16 and res["n_test"] == 8 and res["n_classes"] == 2
    assert 0 <= res["knn_top1_k10"] <= 100
    lin = evaluate_backbone(model, *folders, "linear")
    assert 0 <= lin["linear_top1"] <= 100


def test_bad_eval_inputs_are_user_errors(tmp_path, folders):
    path, model = _backbone(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        evaluate_backbone(model, tmp_path / "nope", folders[1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="ImageFolder"):
        evaluate_backbone(model, tmp_path / "empty", folders[1])
    with pytest.raises(UserError, match="knn or linear"):
        evaluate_backbone(model, *folders, "svm")
    with pytest.raises(UserError, match="checkpoint not found"):
        evaluate_checkpoint(tmp_path / "missing.pth", *folders)


def test_lvdflow_eval_cli_prints_json(tmp_path, folders, capsys):
    from lvdflow.cli import main

    path, _ = _backbone(tmp_path)
    assert main(["eval", "knn", "--checkpoint", str(path), "--train", str(folders[0]), "--test", str(folders[1])]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["eval"] == "knn" and "knn_top1_k20" in out and out["checkpoint"] == str(path)
    assert out["image_size"] == 16  # no saved size, grid below 224: the grid, as before
    assert main(["eval", "knn", "--checkpoint", str(tmp_path / "x.pth"), "--train", str(folders[0]),
                 "--test", str(folders[1])]) == 2


def test_features_see_the_dino_eval_transform_normalised_per_batch():
    """The loader stops at uint8 and the batch is normalised on the device: the backbone must receive what
    torchvision's full per-image transform (resize, crop, scale, ImageNet normalisation) gives."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode, v2

    from pretrain.normalise import IMAGENET_MEAN, IMAGENET_STD
    from pretrain.evaluate import eval_transform, extract_features

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 30), (28, 28))]
    reference = v2.Compose([v2.ToImage(), v2.Resize(18, interpolation=InterpolationMode.BICUBIC, antialias=True),
                            v2.CenterCrop(16), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    seen = []

    class Probe(torch.nn.Module):
        def forward_features(self, x):
            seen.append(x)
            return {"x_norm_clstoken": x.flatten(1)}

    dataset = [(eval_transform(16)(im), 0) for im in images]
    assert dataset[0][0].dtype == torch.uint8
    extract_features(Probe(), dataset, batch_size=2)
    torch.testing.assert_close(seen[0], torch.stack([reference(im) for im in images]), rtol=0, atol=1e-5)


def _hub_like(tmp_path):
    """A ViT with the released models' 518 px grid (37 x 37 patches of 14), tiny width and depth, saved in the
    official hub layout (no metadata)."""
    from pretrain.models.checkpoint import export_official
    from pretrain.models.vit import build_vit

    torch.manual_seed(0)
    model = build_vit("vit_tiny", patch_size=14, img_size=518, embed_dim=32, depth=1, num_heads=2, init_values=None)
    return export_official(model, tmp_path / "hub.pth")


def test_official_518_grid_checkpoint_evaluates_at_224_unless_a_size_is_given(tmp_path, folders, capsys):
    """DINOv2's protocol is resize 256 / crop 224: a hub-layout file carries the 518 grid of its high-resolution
    phase, which is not the size to evaluate at."""
    from lvdflow.cli import main
    from pretrain.models.checkpoint import load_backbone

    path = _hub_like(tmp_path)
    assert load_backbone(path).config.img_size == 518
    res = evaluate_checkpoint(path, *folders, "knn", device="cpu")
    assert res["image_size"] == 224 and 0 <= res["knn_top1_k10"] <= 100
    assert evaluate_checkpoint(path, *folders, "knn", image_size=28, device="cpu")["image_size"] == 28
    assert main(["eval", "knn", "--checkpoint", str(path), "--train", str(folders[0]), "--test", str(folders[1]),
                 "--image-size", "42", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["image_size"] == 42


def test_own_export_evaluates_at_its_runs_evaluation_size(tmp_path, folders):
    """A pretraining run on a 28 px grid with 16 px global crops: its own export records 16 (what its in-training
    kNN used) and is evaluated there; the official-layout export of the same weights has no metadata and falls back
    to its grid (below 224); an explicit size wins over the saved one."""
    from pretrain.models.checkpoint import EVAL_IMAGE_SIZE_KEY, load_state_dict_any
    from pretrain.train import train
    from pretrain_helpers import ListStream, tiny_config

    cfg = tiny_config(img_size=28, global_crops_size=16, total_iters=2, warmup_iters=1, checkpoint_every=100)
    train(cfg, tmp_path / "run", dataset=ListStream(toy_images(8)))
    own, official = tmp_path / "run/teacher/teacher_backbone.pth", tmp_path / "run/teacher/teacher_official.pth"
    assert load_state_dict_any(own)[1]["extra"][EVAL_IMAGE_SIZE_KEY] == 16
    assert set(torch.load(official, weights_only=True)) == set(load_state_dict_any(own)[0])  # nothing added there
    assert evaluate_checkpoint(own, *folders, device="cpu")["image_size"] == 16
    assert evaluate_checkpoint(official, *folders, device="cpu")["image_size"] == 28
    assert evaluate_checkpoint(own, *folders, image_size=24, device="cpu")["image_size"] == 24
    eval_at = tiny_config(img_size=28, global_crops_size=16, eval_image_size=20, total_iters=2, warmup_iters=1,
                          checkpoint_every=100)
    train(eval_at, tmp_path / "run2", dataset=ListStream(toy_images(8)))
    assert evaluate_checkpoint(tmp_path / "run2/teacher/teacher_backbone.pth", *folders,
                               device="cpu")["image_size"] == 20
