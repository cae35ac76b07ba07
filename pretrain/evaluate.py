"""Frozen-feature evaluation of a backbone on ImageFolder layouts (`DIR/<class>/<image>`).

- kNN (DINO / DINOv2 protocol): L2-normalised CLS features, cosine similarity to every train feature
  (faiss inner-product index), the k nearest vote with weights exp(similarity / T), T = 0.07; top-1 for
  k in {10, 20}.
- Linear probe: a linear classifier on frozen features (CLS concatenated with the mean patch token, as
  DINOv2's linear eval with `avgpool`), trained full-batch with AdamW; learning rate and weight decay are
  chosen on a 10% hold-out of the train set, then the classifier is refit on all of it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from lvdflow.errors import UserError
from pretrain.data import data_workers
from pretrain.normalise import BatchNormalise

KNN_KS = (10, 20)
KNN_TEMPERATURE = 0.07
# DINOv2's evaluation resolution (resize 256, centre crop 224), for every released model: their 518 px
# position-embedding grid is the high-resolution adaptation's, not the evaluation protocol's.
PROTOCOL_IMAGE_SIZE = 224


def default_image_size(backbone: torch.nn.Module, saved: int | None = None) -> int:
    """The evaluation resolution when none is asked for.

    1. `saved`: the size this project's exports record (`EVAL_IMAGE_SIZE_KEY`: the run's `eval_image_size
       or global_crops_size`, what its in-training kNN used), so `lvdflow eval` and the evaluate stage
       repeat the pretrain stage's protocol: 224 for vitl14 / distill_vitl_to_vits, 24 for the demos.
    2. Otherwise (official hub .pth, timm, exports older than the key, a bare module):
       min(224, position-embedding grid), rounded down to the patch size. 224 is DINOv2's protocol; the
       grid (img_size) is not, since released and vitl14-style models carry a 518 grid from the
       high-resolution phase (evaluating there costs 5-7x and is another protocol). A grid below 224
       is a small model's training size (the demo profiles train at their grid, 24 px), which upsampling to
       224 would leave.
    """
    if saved:
        return int(saved)
    patch = backbone.patch_size
    size = min(PROTOCOL_IMAGE_SIZE, backbone.config.img_size)
    return max(patch, size // patch * patch)


def eval_transform(image_size: int, resize_ratio: float = 256 / 224) -> v2.Compose:
    """Resize the short side to image_size * 256/224, centre-crop image_size (the DINO eval transform).

    Stops at uint8: `extract_features` normalises whole batches on the model's device, one op per batch
    instead of two transforms per image, and a GPU receives a quarter of the bytes. One CPU thread
    (`python3 -m bench.bench_eval_transform`): 1.18 -> 0.58 ms an image for 28 px Fashion-MNIST, 7.36 ->
    4.44 ms for 500x375 JPEGs at 224 px."""
    return v2.Compose([
        v2.ToImage(), v2.RGB(),
        v2.Resize(int(round(image_size * resize_ratio)), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(image_size),
    ])


def image_folder(root: str | Path, image_size: int):
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"evaluation folder does not exist: {root}")
    try:
        ds = ImageFolder(str(root), transform=eval_transform(image_size))
    except (FileNotFoundError, RuntimeError) as exc:  # no class folders / no images
        raise UserError(f"{root} is not an ImageFolder layout (DIR/<class>/<image>): {exc}") from exc
    return ds


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, dataset, batch_size: int = 256, device: str | torch.device = "cpu",
                     with_patch_mean: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 (N, D) or (N, 2D), labels int64 (N,)) of a dataset of uint8 images (`image_folder`).
    CLS features are L2-normalised. On a GPU, worker processes decode and resize while the model runs."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    workers = data_workers(-1) if on_gpu else 0  # the trainer's policy: this rank's CPUs less one
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=on_gpu)
    backbone = backbone.to(device).eval()
    normalise = BatchNormalise(device)
    feats, labels = [], []
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else _nullcontext()
    for x, y in loader:
        with amp:
            out = backbone.forward_features(normalise(x.to(device, non_blocking=True)))
        cls = F.normalize(out["x_norm_clstoken"].float(), dim=-1)
        if with_patch_mean:
            cls = torch.cat([cls, out["x_norm_patchtokens"].float().mean(1)], dim=-1)
        feats.append(cls.cpu())
        labels.append(y)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy().astype(np.int64)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def knn_classify(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray, test_y: np.ndarray,
                 ks=KNN_KS, temperature: float = KNN_TEMPERATURE) -> dict[str, float]:
    """Weighted kNN top-1 accuracy (%) for each k; features must be L2-normalised."""
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    kmax = min(max(ks), len(train_f))
    try:
        import faiss
    except ImportError:  # e.g. a GPU image without faiss: the same exact search as a matrix product
        faiss = None
    if faiss is not None:
        index = faiss.IndexFlatIP(train_f.shape[1])
        index.add(np.ascontiguousarray(train_f, dtype=np.float32))
        sims, idx = index.search(np.ascontiguousarray(test_f, dtype=np.float32), kmax)
        sims_t, idx_t = torch.from_numpy(sims), torch.from_numpy(idx)
    else:
        sims_t, idx_t = (torch.from_numpy(test_f).float() @ torch.from_numpy(train_f).float().T).topk(kmax, dim=1)
    neighbour_labels = torch.from_numpy(train_y)[idx_t]
    results = {}
    for k in ks:
        kk = min(k, kmax)
        weights = (sims_t[:, :kk] / temperature).exp()
        votes = torch.zeros(len(test_f), n_classes, dtype=torch.float64)
        votes.scatter_add_(1, neighbour_labels[:, :kk], weights.double())
        pred = votes.argmax(1).numpy()
        results[f"knn_top1_k{k}"] = float((pred == test_y).mean() * 100)
    return results


def _train_linear(x: torch.Tensor, y: torch.Tensor, n_classes: int, lr: float, wd: float, epochs: int,
                  seed: int = 0) -> torch.nn.Linear:
    g = torch.Generator().manual_seed(seed)
    clf = torch.nn.Linear(x.shape[1], n_classes)
    torch.nn.init.normal_(clf.weight, std=0.01, generator=g)
    torch.nn.init.zeros_(clf.bias)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(clf(x), y).backward()
        opt.step()
        sched.step()
    return clf


def linear_probe(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray, test_y: np.ndarray,
                 lrs=(1e-3, 1e-2, 1e-1), wds=(0.0, 1e-4, 1e-2), epochs: int = 200, seed: int = 0) -> dict:
    """Top-1 (%) of a linear classifier; hyper-parameters chosen on a 10% hold-out of train."""
    # Small problems run far faster on one thread (no OpenMP spin-waits on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, train_f.size // 2_000_000)))
    try:
        return _linear_probe(train_f, train_y, test_f, test_y, lrs, wds, epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _linear_probe(train_f, train_y, test_f, test_y, lrs, wds, epochs, seed) -> dict:
    x = torch.from_numpy(train_f).float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    xt = (torch.from_numpy(test_f).float() - mean) / std
    y, yt = torch.from_numpy(train_y), torch.from_numpy(test_y)
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, len(x) // 10)
    val, fit = perm[:n_val], perm[n_val:]
    best = None
    for lr in lrs:
        for wd in wds:
            clf = _train_linear(x[fit], y[fit], n_classes, lr, wd, epochs, seed)
            with torch.no_grad():
                acc = float((clf(x[val]).argmax(1) == y[val]).float().mean() * 100)
            if best is None or acc > best[0]:
                best = (acc, lr, wd)
    clf = _train_linear(x, y, n_classes, best[1], best[2], epochs, seed)
    with torch.no_grad():
        top1 = float((clf(xt).argmax(1) == yt).float().mean() * 100)
    return {"linear_top1": top1, "linear_val_top1": best[0], "linear_lr": best[1], "linear_wd": best[2]}


def evaluate_backbone(backbone: torch.nn.Module, train_dir: str | Path, test_dir: str | Path, kind: str = "knn",
                      image_size: int | None = None, device: str | torch.device = "cpu",
                      batch_size: int = 256) -> dict:
    """kNN or linear evaluation; returns a JSON-able dict with top-1 accuracies and set sizes.
    `image_size` None: `default_image_size(backbone)`."""
    if kind not in ("knn", "linear"):
        raise UserError(f"evaluation must be knn or linear, got {kind!r}")
    size = image_size or default_image_size(backbone)
    if size % backbone.patch_size:
        raise UserError(f"image size {size} is not a multiple of the patch size {backbone.patch_size}")
    train_ds, test_ds = image_folder(train_dir, size), image_folder(test_dir, size)
    if train_ds.classes != test_ds.classes:
        raise UserError(f"train and test folders have different classes: {train_ds.classes} vs {test_ds.classes}")
    with_patch = kind == "linear"
    tr_f, tr_y = extract_features(backbone, train_ds, batch_size, device, with_patch_mean=with_patch)
    te_f, te_y = extract_features(backbone, test_ds, batch_size, device, with_patch_mean=with_patch)
    res = knn_classify(tr_f, tr_y, te_f, te_y) if kind == "knn" else linear_probe(tr_f, tr_y, te_f, te_y)
    res.update({"eval": kind, "n_train": len(tr_y), "n_test": len(te_y), "n_classes": len(train_ds.classes),
                "image_size": size})
    if kind == "knn":
        res["temperature"] = KNN_TEMPERATURE
    return res


def evaluate_checkpoint(checkpoint: str | Path, train_dir, test_dir, kind: str = "knn",
                        image_size: int | None = None, device: str | None = None) -> dict:
    """Load a backbone checkpoint (any layout pretrain.models.checkpoint reads) and evaluate it.

    Resolution: `image_size` when given, else the size the export saved, else 224 (or a smaller grid);
    see `default_image_size`."""
    from pretrain.models.checkpoint import EVAL_IMAGE_SIZE_KEY, load_backbone_and_info

    path = Path(checkpoint)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {checkpoint}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone, info = load_backbone_and_info(path)
    size = image_size or default_image_size(backbone, info["extra"].get(EVAL_IMAGE_SIZE_KEY))
    res = evaluate_backbone(backbone, train_dir, test_dir, kind, size, device)
    res["checkpoint"] = str(path)
    return res
