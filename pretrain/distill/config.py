"""Distillation configuration: the trainer's `TrainConfig` plus the students and the masking flag.

Every training key (crops, schedules, losses, checkpoints) means what it means for pretraining, with the
defaults the DINOv2 paper uses for distillation (App. B.1, Table 16): no stochastic depth, LR 1e-3 at
batch 2048, weight decay 0.04 -> 0.2, EMA momentum 0.994 -> 1 (here the momentum of the students' EMA
copies, which are the final models), and no masking. Table 16's LRs are after the sqrt batch rule (its
3.5e-4 at batch 3072 is the vitl14 config's 2e-4 x sqrt(3)): `base_lr` (per 1024 images) is 1e-3 /
sqrt(2), so the rule's peak at batch 2048 is 1e-3.

Students are a list: each entry a preset name of pretrain/models/vit.py (`vit_tiny`) or a mapping
`{arch, name?, embed_dim?, depth?, num_heads?}`. The shared `patch_size`, `img_size`, `ffn_layer`,
`layerscale`, `num_register_tokens` and non-zero `embed_dim` / `depth` / `num_heads` apply to every
student (a profile that distils into several widths leaves `embed_dim` and `num_heads` at 0). An empty
list means one student of `arch`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lvdflow.errors import UserError
from pretrain.config import TrainConfig

_STUDENT_KEYS = {"arch", "name", "embed_dim", "depth", "num_heads"}


@dataclass
class DistillConfig(TrainConfig):
    # Paper defaults for distillation, overriding the pretraining ones.
    arch: str = "vit_small"
    drop_path_rate: float = 0.0
    base_lr: float = 1e-3 / math.sqrt(2)  # peak 1e-3 at the paper's batch of 2048 (sqrt_wrt_1024)
    weight_decay_end: float = 0.2
    momentum_teacher: float = 0.994  # of the students' EMA copies
    # --- distillation --------------------------------------------------------------------------------
    students: list = field(default_factory=list)
    # False (paper): students see unmasked global crops and iBOT runs on all their patch tokens.
    # True (DINOv3 / birder): block masking of `mask_probability` of the global crops, iBOT on masked patches.
    masking: bool = False
    # "auto": the teacher checkpoint's trained heads (the recipe); "fresh": new seeded heads on the teacher's
    # backbone (a bare backbone always gets fresh ones), for a teacher whose heads collapsed.
    teacher_heads: str = "auto"
    # > 0: each student also learns a linear map of its CLS token onto the teacher's CLS token of the same
    # global crop (loss 1 - cosine, this weight); 0 (paper): targets only through the teacher's heads.
    feature_weight: float = 0.0

    def student_specs(self) -> list[dict[str, Any]]:
        """[{name, arch, overrides}] in order, names unique (`arch`, then `arch_2`, ... on repeats)."""
        entries = self.students or [self.arch]
        shared = {k: getattr(self, k) for k in ("embed_dim", "depth", "num_heads") if getattr(self, k)}
        specs, seen = [], {}
        for entry in entries:
            e = {"arch": entry} if isinstance(entry, str) else dict(entry)
            name = e.pop("name", None) or e["arch"]
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                name = f"{name}_{seen[name]}"
            arch = e.pop("arch")
            specs.append({"name": name, "arch": arch, "overrides": {**shared, **e}})
        return specs

    def validate(self) -> "DistillConfig":
        super().validate()
        from pretrain.models.vit import ARCHS

        problems = []
        if self.feature_weight < 0:
            problems.append(f"feature_weight must be >= 0, got {self.feature_weight}")
        if self.teacher_heads not in ("auto", "fresh"):
            problems.append(f"teacher_heads must be auto|fresh, got {self.teacher_heads!r}")
        for entry in self.students or [self.arch]:
            if isinstance(entry, str):
                entry = {"arch": entry}
            if not isinstance(entry, dict) or "arch" not in entry:
                problems.append(f"a student must be an arch name or a mapping with 'arch', got {entry!r}")
                continue
            if entry["arch"] not in ARCHS:
                problems.append(f"unknown student arch {entry['arch']!r} (choose from {', '.join(ARCHS)})")
            unknown = set(entry) - _STUDENT_KEYS
            if unknown:
                problems.append(f"unknown student keys {sorted(unknown)} (allowed: {sorted(_STUDENT_KEYS)})")
        if problems:
            raise UserError("invalid distillation config: " + "; ".join(problems))
        return self


def load_distill_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> DistillConfig:
    """Defaults <- profile file (YAML or JSON) <- overrides (unknown keys are an error, as for training)."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            if p.suffix == ".json":  # not through YAML: YAML 1.1 reads JSON's 1e-05 as a string
                values = json.loads(p.read_text())
            else:
                import yaml

                values = yaml.safe_load(p.read_text()) or {}
        except Exception as exc:
            raise UserError(f"cannot parse config {path}: {exc}") from exc
        if not isinstance(values, dict):
            raise UserError(f"config {path} must be a mapping of keys to values")
    values.update(overrides or {})
    return DistillConfig.from_dict(values)
