"""Per-iteration schedules (DINOv2 `CosineScheduler` and the values `train.py` builds from the config).

All schedules are numpy arrays indexed by iteration, so a resumed run reads the same values from the
schedule step alone, and the units are iterations (not "epochs" of a fixed length): small runs set their
warm-ups as iteration counts or fractions of the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def cosine_schedule(base: float, final: float, total_iters: int, warmup_iters: int = 0,
                    start_warmup_value: float = 0.0, freeze_iters: int = 0) -> np.ndarray:
    """`freeze_iters` zeros, then a linear warm-up from `start_warmup_value` to `base`, then a half cosine
    from `base` to `final` over the remaining iterations."""
    if total_iters <= 0:
        raise ValueError("total_iters must be positive")
    freeze_iters = min(freeze_iters, total_iters)
    warmup_iters = min(warmup_iters, total_iters - freeze_iters)
    freeze = np.zeros(freeze_iters)
    warmup = np.linspace(start_warmup_value, base, warmup_iters, endpoint=False) if warmup_iters else np.zeros(0)
    n = total_iters - freeze_iters - warmup_iters
    steps = np.arange(n)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(n, 1)))
    out = np.concatenate([freeze, warmup, cosine])
    assert len(out) == total_iters
    return out


def linear_warmup_then_constant(start: float, end: float, total_iters: int, warmup_iters: int) -> np.ndarray:
    warmup_iters = min(warmup_iters, total_iters)
    return np.concatenate([np.linspace(start, end, warmup_iters, endpoint=False) if warmup_iters else np.zeros(0),
                           np.full(total_iters - warmup_iters, end)])


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 1024) -> float:
    """DINOv2's `sqrt_wrt_1024` rule: lr = base_lr * sqrt(global batch / 1024)."""
    return base_lr * math.sqrt(global_batch / reference_batch)


@dataclass
class Schedules:
    lr: np.ndarray
    last_layer_lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray

    def at(self, it: int) -> dict[str, float]:
        # The last value persists past the end (e.g. a run extended after its schedule was built).
        i = min(it, len(self.lr) - 1)
        return {"lr": float(self.lr[i]), "last_layer_lr": float(self.last_layer_lr[i]), "wd": float(self.wd[i]),
                "momentum": float(self.momentum[i]), "teacher_temp": float(self.teacher_temp[i])}


def build_schedules(*, total_iters: int, lr: float, min_lr: float, warmup_iters: int, weight_decay: float,
                    weight_decay_end: float, momentum_teacher: float, final_momentum_teacher: float,
                    teacher_temp: float, warmup_teacher_temp: float, warmup_teacher_temp_iters: int,
                    freeze_last_layer_iters: int) -> Schedules:
    """LR warm-up + cosine (to `min_lr`), WD cosine up, teacher momentum cosine to 1, teacher temperature
    linear warm-up then constant, last-layer LR = LR zeroed for the first `freeze_last_layer_iters`."""
    lr_s = cosine_schedule(lr, min_lr, total_iters, warmup_iters)
    last = cosine_schedule(lr, min_lr, total_iters, warmup_iters)
    last[:min(freeze_last_layer_iters, total_iters)] = 0.0
    return Schedules(
        lr=lr_s,
        last_layer_lr=last,
        wd=cosine_schedule(weight_decay, weight_decay_end, total_iters),
        momentum=cosine_schedule(momentum_teacher, final_momentum_teacher, total_iters),
        teacher_temp=linear_warmup_then_constant(warmup_teacher_temp, teacher_temp, total_iters,
                                                 warmup_teacher_temp_iters),
    )
