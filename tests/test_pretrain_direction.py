"""Pretraining learns: a short run of the real pretrain stage beats the same ViT at random init on kNN.

Issue #6's bar (the demo config, ~10 minutes, >= 5 points over random init) is measured by
bench/bench_pretrain.py; this test checks its direction on a run short enough for the test suite
(~200 iterations, well under a minute of training on a 2-core CPU). Everything between the images and the
number is the product's path: Fashion-MNIST PNGs -> `run_ingest` -> `run_shard` (WebDataset shards) ->
`run_pretrain` (what `lvdflow pretrain` runs: the DINOv2 trainer with the DINO, iBOT and KoLeo losses,
multi-crop augmentation, masking, EMA teacher) -> kNN top-1 of the exported teacher and of the same
architecture at random init with the same seed (`run_pretrain`'s own baseline), on a held-out labelled
split: the kNN memory is Fashion-MNIST train images not in the shards, the queries are its test split.

Why this config learns reliably in 200 iterations (the demo config of the time, cut to 60-80 iterations,
gave -1.0 ... +6.8 points depending on the seed). Starting from the demo profile, the overrides are (the
demo profile has since taken the centering, milder crops, fast teacher and rate from here; the test still
sets every one of them, and the paper's blur the figures below were measured with, so it does not move when
the demo profile does):

- Sinkhorn-Knopp centering (DINOv2's option, from SwAV) instead of the EMA centre. With the EMA centre the
  short runs' teacher first collapsed onto a few prototypes (teacher entropy 2.9 -> 1.0 of log K = 5.5 in
  20 iterations) until the slow centre caught up, wasting much of a short run; Sinkhorn-Knopp balances
  the prototypes in every batch from the first iteration (24 px crops, 150 iterations, same seed:
  +7.8 / +7.3 points at k=10 / 20 instead of +4.9 / +3.5).
- 16 px crops of the 28 px images (16 tokens a global crop, 4 a local one), a 64-wide, 3-block ViT and a
  256-prototype head: about 0.2 s an iteration, most of it the augmentation, so 200 iterations fit.
  Most of the gain comes early (+5 to +6 points by iteration 50, then slowly more).
- Milder crops (global scale 0.5-1, local 0.2-0.5: a 0.1-scale local crop of a 28 px image is a 9 px
  sliver that shares little with the global views) and a teacher that follows the student closely
  (EMA momentum 0.9 -> 0.99 instead of 0.99 -> 1.0; a short run has no time for a slow teacher).
- Learning rate 1.5e-3 (the demo's is 2e-3): the seed-to-seed spread is what threatens the bar, and it
  grew with the rate. Two weak seeds gave +5.9 / +7.0 and +6.4 / +7.3 at 1.5e-3, +3.3 / +4.4 and
  +4.7 / +6.5 at 3e-3, and one fell to +0.2 at 5e-3.
- The margin is measured on 3000 queries against a 3000-image memory: with 500 queries the kNN
  difference between two models on the same queries has a sampling noise of about 2 points by itself.

Measured on the 2-core CPU this was written on, seeds 0-7, margins at k=10 / k=20 (random init ~55%,
trained 60.6-64.0%): +9.0/+8.8, +5.9/+7.0, +7.7/+8.1, +5.8/+6.0, +6.7/+9.0, +6.4/+7.3, +6.9/+8.7,
+6.8/+6.7: the smallest is 5.8, against the bar of 3 (mean 6.9 / 7.7, sd 1.0 / 1.1). The total loss fell from
~9.2 (first 5 iterations) to ~8.0 (last 20) in every run.
The check can fail: with learning rate 0 (200 iterations) the teacher stays at its random init, the
margin is exactly 0.0 and the loss stays at 9.4; with the teacher frozen (EMA momentum 1) the student's
loss falls as usual (9.2 -> 8.0) but the teacher's margin is 0.0, which is why the test asserts on kNN and
not on the loss alone. The second test runs the learning-rate-0 control, short.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

N_TRAIN = 2000  # training images (Fashion-MNIST train split) written into the shards
EVAL_PER_CLASS = 300  # kNN memory (train split, not in the shards) and queries (test split), per class
MIN_GAIN = 3.0  # kNN top-1 points over random init, for k = 10 and k = 20

# The demo profile (pretrain/configs/demo.yaml) with these changes; the module docstring says why.
SHORT_RUN = dict(
    embed_dim=64, depth=3, drop_path_rate=0.0,
    dino_prototypes=256, ibot_prototypes=256, head_hidden_dim=256, head_bottleneck_dim=64,
    img_size=16, global_crops_size=16, local_crops_size=8,
    global_crops_scale=[0.5, 1.0], local_crops_scale=[0.2, 0.5],
    centering="sinkhorn_knopp", blur_sigma=[0.1, 2.0],
    total_iters=200, warmup_iters=20, base_lr=1.5e-3,
    momentum_teacher=0.9, final_momentum_teacher=0.99,
    warmup_teacher_temp_iters=10, freeze_last_layer_iters=5,
    checkpoint_every=10_000, eval_every=0, log_every=1,
)


def build_data(root: Path) -> tuple[Path, Path, Path]:
    """(shards, eval_train, eval_test) from Fashion-MNIST: disjoint train-split images for the shards and
    the kNN memory, test-split images as queries."""
    from curation.demo_data import CLASSES, load_fashion_mnist
    from curation.ingest import run_ingest
    from shards.writer import run_shard

    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    order = np.random.default_rng(0).permutation(len(train_y))
    pool = root / "pool"
    pool.mkdir(parents=True)
    for i in order[:N_TRAIN]:
        Image.fromarray(train_x[i]).save(pool / f"fm_{i:05d}.png")

    def per_class(idx, labels):
        taken: dict[int, list[int]] = {}
        for i in idx:
            bucket = taken.setdefault(int(labels[i]), [])
            if len(bucket) < EVAL_PER_CLASS:
                bucket.append(int(i))
        return [i for c in sorted(taken) for i in taken[c]]

    splits = {"train": (per_class(order[N_TRAIN:], train_y), train_x, train_y),
              "test": (per_class(np.random.default_rng(1).permutation(len(test_y)), test_y), test_x, test_y)}
    for split, (idx, xs, ys) in splits.items():
        for c in CLASSES:
            (root / "eval" / split / c).mkdir(parents=True)
        for i in idx:
            Image.fromarray(xs[i]).save(root / "eval" / split / CLASSES[ys[i]] / f"{i:05d}.png")
    run_ingest([pool], root / "ingest", workers=0)
    run_shard(root / "ingest", root / "shards", max_count=500)
    return root / "shards", root / "eval" / "train", root / "eval" / "test"


def short_run(data: tuple[Path, Path, Path], out: Path, seed: int = 0, **overrides) -> dict:
    """The pretrain stage on the demo profile with SHORT_RUN (and `overrides`). Returns the kNN margins
    over random init (k=10, 20), both kNN results and the per-iteration total losses."""
    from pretrain.metrics_log import read_metrics
    from pretrain.run_pretrain import run_pretrain

    shards, eval_train, eval_test = data
    m = run_pretrain(shards, out, config="demo", overrides={**SHORT_RUN, "seed": seed, **overrides},
                     eval_train=eval_train, eval_test=eval_test)
    losses = [r["total_loss"] for r in read_metrics(out / "metrics.jsonl") if "total_loss" in r]
    margins = {k: m["knn"][k] - m["knn_random_init"][k] for k in ("knn_top1_k10", "knn_top1_k20")}
    return {"margins": margins, "knn": m["knn"], "knn_random_init": m["knn_random_init"], "losses": losses}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_data(tmp_path_factory.mktemp("fmnist"))


def test_short_pretraining_beats_random_init_on_knn(data, tmp_path):
    r = short_run(data, tmp_path / "run", seed=0)
    print(json.dumps({k: r[k] for k in ("margins", "knn", "knn_random_init")}))
    losses = r["losses"]
    assert len(losses) == SHORT_RUN["total_iters"]
    # The loss fell: ~9.2 over the first 5 iterations, ~8.0 over the last 20 (9.46 -> 9.40 at lr 0).
    first, last = float(np.mean(losses[:5])), float(np.mean(losses[-20:]))
    assert last < first - 0.5, (first, last)
    for k, gain in r["margins"].items():
        assert gain >= MIN_GAIN, f"{k}: trained {r['knn'][k]:.1f} vs random init {r['knn_random_init'][k]:.1f}"


def test_without_learning_the_margin_is_zero(data, tmp_path):
    """The negative control: learning rate 0 leaves the teacher at its random init, so the same measurement
    gives no margin (the assertion above would fail). Short: nothing changes however long it runs."""
    r = short_run(data, tmp_path / "run", seed=0, total_iters=10, warmup_iters=2, base_lr=0.0, min_lr=0.0)
    for k, gain in r["margins"].items():
        assert abs(gain) < 0.5, (k, gain)
