"""Training configuration: one flat dataclass with DINOv2's defaults, overridden by a YAML/JSON profile.

Schedule lengths are in iterations (DINOv2's "epochs" are an arbitrary 1250-iteration unit). A profile
file holds only the keys it changes; unknown keys are an error (a typo must not silently train with a
default).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lvdflow.errors import UserError


@dataclass
class TrainConfig:
    # --- backbone (pretrain/models/vit.py presets; 0 / None keep the preset's value) -----------------
    arch: str = "vit_small"
    patch_size: int = 14
    img_size: int = 224  # position-embedding grid x patch (other crop sizes are interpolated)
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    ffn_layer: str = "mlp"
    layerscale: float = 1e-5
    num_register_tokens: int = 0
    drop_path_rate: float = 0.3
    drop_path_uniform: bool = True
    # --- heads ---------------------------------------------------------------------------------------
    dino_prototypes: int = 65536
    ibot_prototypes: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    ibot_separate_head: bool = False
    ibot_head_bottleneck_dim: int = 0  # a separate iBOT head's bottleneck; 0: head_bottleneck_dim (vitl14: 256 vs 384)
    norm_last_layer: bool = False  # DINOv1: freeze the prototypes' weight-norm g at 1 (stabler for small models)
    # --- losses --------------------------------------------------------------------------------------
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    centering: str = "centering"  # or "sinkhorn_knopp"
    mask_probability: float = 0.5
    mask_ratio_min: float = 0.1
    mask_ratio_max: float = 0.5
    # --- crops ---------------------------------------------------------------------------------------
    global_crops_size: int = 224
    local_crops_size: int = 98
    local_crops_number: int = 8
    global_crops_scale: list = field(default_factory=lambda: [0.32, 1.0])
    local_crops_scale: list = field(default_factory=lambda: [0.05, 0.32])
    blur_probabilities: str = "paper"  # or "official" (the released checkpoints' inverted ones)
    blur_sigma: list = field(default_factory=lambda: [0.1, 2.0])  # Gaussian blur sigma range in pixels (224 px crops)
    color_jitter: list = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])  # brightness, contrast, saturation, hue
    # --- optimisation (iterations) -------------------------------------------------------------------
    batch_size_per_rank: int = 64
    total_iters: int = 125000
    base_lr: float = 4e-3
    lr_scaling: str = "sqrt_wrt_1024"  # or "none"
    min_lr: float = 1e-6
    warmup_iters: int = 12500
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_iters: int = 37500
    freeze_last_layer_iters: int = 1250
    clip_grad: float = 3.0
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    adamw_betas: list = field(default_factory=lambda: [0.9, 0.999])
    # --- final high-resolution phase (paper: last 10k iterations at 518 px); 0 = off ------------------
    highres_iters: int = 0
    highres_global_crops_size: int = 518
    highres_local_crops_size: int = 98
    # --- run -----------------------------------------------------------------------------------------
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    export_every: int = 0  # teacher export in the official layout every N iterations (0: only at the end)
    log_every: int = 10
    eval_every: int = 0  # kNN on eval_train/eval_test every N iterations (0: only at the end)
    eval_image_size: int = 0  # 0: global_crops_size
    num_threads: int = 0  # torch CPU threads (0: torch's default)
    data_workers: int = -1  # batch-making processes (-1: none on CPU; on GPU the rank's CPUs less one)
    compile: bool = False  # torch.compile each transformer block and the loss kernels (GPU runs; before FSDP2)
    stop_after: int = 0  # stop (after checkpointing) once this iteration is reached; 0: run to total_iters

    def validate(self) -> "TrainConfig":
        problems = []
        if self.centering not in ("centering", "sinkhorn_knopp"):
            problems.append(f"centering must be centering|sinkhorn_knopp, got {self.centering!r}")
        if self.blur_probabilities not in ("paper", "official"):
            problems.append(f"blur_probabilities must be paper|official, got {self.blur_probabilities!r}")
        if len(self.blur_sigma) != 2 or not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            problems.append(f"blur_sigma must be [min, max] with 0 < min <= max, got {self.blur_sigma!r}")
        if self.lr_scaling not in ("sqrt_wrt_1024", "none"):
            problems.append(f"lr_scaling must be sqrt_wrt_1024|none, got {self.lr_scaling!r}")
        if self.batch_size_per_rank < 2:
            problems.append("batch_size_per_rank must be >= 2 (KoLeo needs two samples per process)")
        if self.total_iters < 1:
            problems.append("total_iters must be >= 1")
        if self.ibot_head_bottleneck_dim < 0:
            problems.append(f"ibot_head_bottleneck_dim must be 0 (the DINO head's) or more, got {self.ibot_head_bottleneck_dim}")
        if self.data_workers < -1:
            problems.append(f"data_workers must be -1 (automatic), 0 or more, got {self.data_workers}")
        sizes = ["global_crops_size", "local_crops_size", "img_size"]
        if self.highres_iters:
            sizes += ["highres_global_crops_size", "highres_local_crops_size"]
        for name in sizes:
            if getattr(self, name) % self.patch_size:
                problems.append(f"{name}={getattr(self, name)} is not a multiple of patch_size={self.patch_size}")
        if not 0 <= self.mask_ratio_min <= self.mask_ratio_max <= 1:
            problems.append("need 0 <= mask_ratio_min <= mask_ratio_max <= 1")
        if self.highres_iters < 0 or self.highres_iters > self.total_iters:
            problems.append("highres_iters must be between 0 and total_iters")
        if problems:
            raise UserError("invalid training config: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise UserError(f"unknown training config keys: {', '.join(unknown)}")
        wrong = [f"{k}={v!r} (wants {known[k].type})" for k, v in d.items() if not _fits(v, known[k].type)]
        if wrong:
            raise UserError(f"training config values of the wrong type: {', '.join(wrong)}")
        return cls(**d).validate()


def _fits(value: Any, type_name: str) -> bool:
    """Whether a profile / --set value suits a field annotated `type_name` (int, float, str, bool, list);
    ints serve where floats are wanted, as YAML writes 1 for 1.0."""
    if type_name == "bool":
        return isinstance(value, bool)
    if type_name == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_name == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if type_name == "str":
        return isinstance(value, str)
    if type_name == "list":
        return isinstance(value, (list, tuple))
    return True


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- profile file (YAML or JSON) <- overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {path}")
        text = p.read_text()
        try:
            if p.suffix in (".yaml", ".yml"):
                import yaml

                values = yaml.safe_load(text) or {}
            else:
                values = json.loads(text)
        except Exception as exc:  # parse errors are the user's to fix
            raise UserError(f"cannot parse config {path}: {exc}") from exc
        if not isinstance(values, dict):
            raise UserError(f"config {path} must be a mapping of keys to values")
    values.update(overrides or {})
    return TrainConfig.from_dict(values)


CONFIG_DIR = Path(__file__).parent / "configs"


def profile_path(name: str) -> Path:
    """A bundled profile by name (`demo`) or a path."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml", ".json") or p.exists():
        return p
    return CONFIG_DIR / f"{name}.yaml"
