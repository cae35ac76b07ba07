"""Backbone checkpoints: load official DINOv2, timm and this project's files; save and export.

`load_backbone(path)` accepts, with strict key matching (every tensor used, every parameter filled):
- official DINOv2 hub backbones (`dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`): a flat state dict with keys
  `cls_token`, `pos_embed`, `mask_token`, [`register_tokens`], `patch_embed.proj.*`, `blocks.N.*`, `norm.*`;
  also the FSDP "block chunk" layout `blocks.C.N.*` of DINOv2 training, and training/eval exports wrapped as
  {"teacher"|"student"|"model"|"state_dict": ...} with `module.`/`backbone.` prefixes (heads are dropped);
- this project's checkpoints (`save_backbone`): {"format": "lvdflow-vit", "version": 1, "config": {...},
  "model": state dict in the official key layout, "extra"?: plain metadata such as the training iteration and
  `eval_image_size`, the resolution its run evaluated at (`load_backbone_and_info` returns it)};
- timm ViT weights (`.safetensors`, or a .pth/.bin with timm keys): `reg_token`, a position embedding
  without the CLS slot (`no_embed_class`, timm's DINOv2 register models), SwiGLU as packed `mlp.fc1/fc2`,
  no `mask_token` (filled with zeros: only iBOT training uses it); a classifier `head.*` is dropped.

The architecture comes from the tensor shapes: width from `cls_token`, patch size from the patch
projection, depth from the block indices, FFN kind and width from the first block, register count, grid
from the position embedding. The head count cannot be seen in the weights: it defaults to width/64 (all
DINOv2 sizes), to timm's 16 for timm files of ViT-H/g/G widths (TIMM_HEADS), and can be given.
Position-embedding resampling follows the source: official plain models use DINOv2's legacy offset 0.1
without antialiasing, official register models and timm models size-based bicubic with antialiasing, own
checkpoints what their config says.

Files are read with `torch.load(weights_only=True)` (no code execution) or safetensors.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lvdflow.errors import UserError
from pretrain.models.vit import VisionTransformer, ViTConfig

OWN_FORMAT = "lvdflow-vit"
# timm's ViTs have 64-dim heads except its huge, giant and gigantic widths, 16 heads each (vit_huge_patch14_*,
# vit_giant_patch14_224, vit_gigantic_patch14_224); its DINOv2 ports keep DINOv2's 64 (1536 -> 24). A wrong
# head count loads without error and gives other features, so timm files default to timm's own counts.
TIMM_HEADS = {1280: 16, 1408: 16, 1664: 16}
OWN_VERSION = 1
# The `extra` key of this project's exports holding the resolution the run evaluated at (its
# `eval_image_size or global_crops_size`): what `lvdflow eval` uses when no size is given.
EVAL_IMAGE_SIZE_KEY = "eval_image_size"

_WRAPPERS = ("teacher", "student", "model", "state_dict", "model_state_dict")
_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.*)$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


# ---- reading -----------------------------------------------------------------------------------------
def _read_file(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise UserError(f"cannot read safetensors checkpoint {path}: {exc}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read checkpoint {path} with torch.load(weights_only=True): {_why(exc)}") from exc


def _why(exc: Exception) -> str:
    """The cause in torch.load's error, on one line: its own message is a paragraph of advice on
    weights_only=False (which this loader never uses: a checkpoint must hold tensors, not code), with the
    actual reason after 'WeightsUnpickler error:'."""
    text = " ".join(str(exc).split())
    if "WeightsUnpickler error:" in text:
        reason = text.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation")[0].strip()
        reason = reason.split(". Please use")[0]  # drop the advice to allowlist the global
        what = ("it holds Python objects, not only tensors" if "global" in reason.lower()
                else "not a PyTorch checkpoint")
        return f"{what} ({reason})"
    if isinstance(exc, EOFError) or not text:
        return f"empty or truncated file ({exc.__class__.__name__})"
    return f"{exc.__class__.__name__}: {text[:300]}"


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, Tensor], dict[str, Any] | None, dict[str, Any]]:
    """(flat tensor dict, own config or None, own extra metadata or {}) from whatever torch.load returned."""
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a state dict, got {type(obj).__name__}")
    if obj.get("format") == OWN_FORMAT:
        if obj.get("version") != OWN_VERSION:
            raise UserError(f"{path}: {OWN_FORMAT} version {obj.get('version')} is not supported")
        extra = obj.get("extra")
        return dict(obj["model"]), dict(obj["config"]), dict(extra) if isinstance(extra, dict) else {}
    if not any(isinstance(v, Tensor) for v in obj.values()):
        for key in _WRAPPERS:
            if isinstance(obj.get(key), dict):
                return _unwrap(obj[key], path)
        raise UserError(f"{path}: no tensors and none of the wrapper keys {_WRAPPERS} found")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}, None, {}


def _strip_prefixes(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    # torch.compile and DDP wrappers add these; they never belong to the weights' names.
    for prefix in ("_orig_mod.", "module."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):
        # A training checkpoint (backbone + dino_head/ibot_head): the heads are not part of a backbone.
        sd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def _unchunk(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """FSDP BlockChunk layout `blocks.C.N.rest` (N is the global index) -> `blocks.N.rest`."""
    if not any(_CHUNKED.match(k) for k in sd):
        return sd
    out = {}
    for k, v in sd.items():
        m = _CHUNKED.match(k)
        out[f"blocks.{m.group(2)}.{m.group(3)}" if m else k] = v
    return out


def _is_timm(sd: dict[str, Tensor]) -> bool:
    if "reg_token" in sd:
        return True
    if "mask_token" in sd:
        return False
    # timm has no mask token; its position embedding may lack the CLS slot (no_embed_class)
    return "cls_token" in sd and "pos_embed" in sd


def _from_timm(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm ViT keys -> official DINOv2 keys (the inverse of timm's `_convert_dinov2`)."""
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    out: dict[str, Tensor] = {}
    d = sd["cls_token"].shape[-1]
    if "reg_token" in sd:
        out["register_tokens"] = sd.pop("reg_token")
    pos = sd.pop("pos_embed")
    n = pos.shape[1]
    if math_isqrt_square(n):
        # no_embed_class: the CLS position embedding was folded into cls_token, so a zero slot is exact.
        pos = torch.cat([torch.zeros(1, 1, d, dtype=pos.dtype), pos], dim=1)
    out["pos_embed"] = pos
    out["mask_token"] = torch.zeros(1, d, dtype=sd["cls_token"].dtype)
    for k, v in sd.items():
        m = re.match(r"^(blocks\.\d+\.mlp\.)(fc1|fc2)\.(weight|bias)$", k)
        if m and _timm_block_is_swiglu(sd, k):
            out[f"{m.group(1)}{'w12' if m.group(2) == 'fc1' else 'w3'}.{m.group(3)}"] = v
        else:
            out[k] = v
    return out


def math_isqrt_square(n: int) -> bool:
    r = int(round(n**0.5))
    return r * r == n


def _timm_block_is_swiglu(sd: dict[str, Tensor], key: str) -> bool:
    # timm's SwiGLUPacked fc1 outputs 2x the width that fc2 takes in; a GELU MLP's are equal.
    prefix = key.rsplit(".mlp.", 1)[0] + ".mlp."
    fc1, fc2 = sd.get(prefix + "fc1.weight"), sd.get(prefix + "fc2.weight")
    return fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]


# ---- architecture from shapes ------------------------------------------------------------------------
def infer_config(sd: dict[str, Tensor], num_heads: int | None = None, **overrides: Any) -> ViTConfig:
    """The ViTConfig that has exactly these tensors (official key layout)."""
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"):
        if key not in sd:
            raise UserError(f"not a ViT backbone state dict: missing {key!r}")
    d = sd["cls_token"].shape[-1]
    pw = sd["patch_embed.proj.weight"]
    patch, in_chans = pw.shape[-1], pw.shape[1]
    blocks = sorted({int(m.group(1)) for k in sd if (m := _BLOCK.match(k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise UserError(f"block indices are not 0..N-1: {blocks[:5]}...{blocks[-5:]}")
    n_pos = sd["pos_embed"].shape[1] - 1
    grid = int(round(n_pos**0.5))
    if grid * grid != n_pos:
        raise UserError(f"position embedding of {n_pos} patches is not a square grid")
    if "blocks.0.mlp.w12.weight" in sd:
        ffn, hidden = "swiglu", sd["blocks.0.mlp.w12.weight"].shape[0] // 2
    elif "blocks.0.mlp.fc1.weight" in sd:
        ffn, hidden = "mlp", sd["blocks.0.mlp.fc1.weight"].shape[0]
    else:
        raise UserError("cannot find the FFN of block 0 (mlp.fc1 or mlp.w12)")
    heads = num_heads or max(d // 64, 1)
    if d % heads:
        raise UserError(f"width {d} is not divisible by {heads} heads; pass num_heads")
    fields: dict[str, Any] = dict(
        embed_dim=d,
        depth=len(blocks),
        num_heads=heads,
        patch_size=patch,
        in_chans=in_chans,
        img_size=grid * patch,
        ffn_layer=ffn,
        ffn_hidden=hidden,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        proj_bias="blocks.0.attn.proj.bias" in sd,
        ffn_bias=("blocks.0.mlp.w12.bias" if ffn == "swiglu" else "blocks.0.mlp.fc1.bias") in sd,
        init_values=1.0 if "blocks.0.ls1.gamma" in sd else None,  # the loaded gammas replace it
        num_register_tokens=sd["register_tokens"].shape[1] if "register_tokens" in sd else 0,
    )
    fields.update(overrides)
    return ViTConfig(**fields)


# ---- strict loading ----------------------------------------------------------------------------------
def load_weights_strict(model: VisionTransformer, sd: dict[str, Tensor], source: str = "checkpoint") -> None:
    """load_state_dict(strict=True) with an error that names the offending keys and shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(sd) & set(expected)
        if sd[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong:
        parts = []
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)):
            if keys:
                more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                parts.append(f"{what}: {', '.join(keys[:8])}{more}")
        raise UserError(f"{source} does not match the backbone architecture; " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


def load_state_dict_any(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint of any supported layout -> (state dict in the official layout, info).

    info: {"format": "lvdflow"|"official"|"timm", "config": dict or None (own format only),
    "extra": the own format's metadata ({} for the others), "interpolate_offset", "interpolate_antialias"}.
    """
    path = Path(path)
    sd, own_config, extra = _unwrap(_read_file(path), path)
    if own_config is not None:
        return sd, {"format": "lvdflow", "config": own_config, "extra": extra}
    sd = _unchunk(_strip_prefixes(sd))
    if _is_timm(sd):
        return _from_timm(sd), {"format": "timm", "config": None, "extra": {}, "interpolate_offset": 0.0,
                                "interpolate_antialias": True}
    regs = "register_tokens" in sd
    # DINOv2 hub rule: plain models were released with the legacy offset, register models without it.
    return sd, {
        "format": "official",
        "config": None,
        "extra": {},
        "interpolate_offset": 0.0 if regs else 0.1,
        "interpolate_antialias": regs,
    }


def load_backbone(
    path: str | Path, num_heads: int | None = None, **overrides: Any
) -> VisionTransformer:
    """Build the backbone described by a checkpoint and load its weights (strict). Returns it in eval mode.

    `overrides` set ViTConfig fields the weights cannot show (e.g. drop_path_rate for fine-tuning).
    """
    return load_backbone_and_info(path, num_heads, **overrides)[0]


def load_backbone_and_info(
    path: str | Path, num_heads: int | None = None, **overrides: Any
) -> tuple[VisionTransformer, dict[str, Any]]:
    """`load_backbone` plus the file's info (`load_state_dict_any`: format, config, extra metadata)."""
    sd, info = load_state_dict_any(path)
    if info["config"] is not None:
        cfg = ViTConfig.from_dict(info["config"])
        if num_heads is not None:
            overrides["num_heads"] = num_heads
        cfg = ViTConfig(**{**cfg.to_dict(), **overrides})
    else:
        interp = {k: info[k] for k in ("interpolate_offset", "interpolate_antialias")}
        if num_heads is None and info["format"] == "timm" and "cls_token" in sd:
            num_heads = TIMM_HEADS.get(sd["cls_token"].shape[-1])
        cfg = infer_config(sd, num_heads=num_heads, **{**interp, **overrides})
    model = VisionTransformer(cfg)
    load_weights_strict(model, sd, source=f"{path} ({info['format']} layout)")
    return model.eval(), info


# ---- writing -----------------------------------------------------------------------------------------
def _cpu_state_dict(model: VisionTransformer) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_backbone(model: VisionTransformer, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """This project's backbone file: config + weights (official key names), loadable with weights_only.

    `extra` may hold plain metadata (numbers, strings, lists, dicts of those), e.g. the training step and
    `EVAL_IMAGE_SIZE_KEY`. It stays outside the weights: `export_official` files never carry it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"format": OWN_FORMAT, "version": OWN_VERSION, "config": model.config.to_dict(), "model": _cpu_state_dict(model)}
    if extra:
        obj["extra"] = extra
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
    return path


def export_official(model: VisionTransformer, path: str | Path) -> Path:
    """Save the bare state dict in the official DINOv2 hub layout.

    The official code loads it with `DinoVisionTransformer(img_size=<grid x patch>, patch_size=..., ...,
    num_register_tokens=..., ffn_layer="mlp"|"swiglufused", init_values=<any, if LayerScale is used>)` and
    `load_state_dict(strict=True)`; `load_backbone` reads it back to the same model (with width/64 heads
    unless num_heads is given).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(_cpu_state_dict(model), tmp)
    tmp.replace(path)
    return path
