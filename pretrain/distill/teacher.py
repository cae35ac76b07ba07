"""The frozen teacher of distillation: a backbone with its DINO (and iBOT) heads.

`load_teacher(path)` accepts
- a pretraining run directory (`OUT` of `lvdflow pretrain` / pretrain.train) or its `teacher/` (or an
  `exports/it_N/`) folder, or the `teacher_checkpoint.pth` in it: `{"teacher": backbone.* + dino_head.*
  [+ ibot_head.*]}`, the trained heads included (the official distillation layout). The backbone's exact
  config comes from the sibling `teacher_backbone.pth` when present (head count included), else from the
  tensor shapes;
- a bare backbone in any layout `load_backbone` reads (official DINOv2 hub weights, timm, this project's
  files). It has no heads, so fresh ones are built (seeded) with the config's head sizes: the targets are
  then a fixed random projection of the teacher's features; this distils the features, but a checkpoint
  with trained heads gives the DINOv2 recipe.

The teacher is returned in eval mode with every parameter `requires_grad=False`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from lvdflow.errors import UserError
from pretrain.heads import DINOHead

CHECKPOINT_NAME = "teacher_checkpoint.pth"
BACKBONE_NAME = "teacher_backbone.pth"
_MLP_WEIGHT = re.compile(r"^mlp\.(\d+)\.weight$")


def resolve_teacher_path(path: str | Path) -> Path:
    """The file to read for `path` (a run directory, a teacher/export directory, or a file)."""
    p = Path(path)
    if p.is_dir():
        for cand in (p / CHECKPOINT_NAME, p / "teacher" / CHECKPOINT_NAME):
            if cand.is_file():
                return cand
        raise UserError(f"no {CHECKPOINT_NAME} in {p} or {p / 'teacher'} (give a pretraining run directory, "
                        f"its teacher folder, or a checkpoint file)")
    if not p.is_file():
        raise UserError(f"teacher checkpoint not found: {path}")
    return p


def head_from_state_dict(sd: dict[str, torch.Tensor], prefix: str) -> DINOHead:
    """A DINOHead shaped like the `prefix.*` tensors of `sd`, loaded strictly."""
    own = {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}
    linears = sorted(int(m.group(1)) for k in own if (m := _MLP_WEIGHT.match(k)))
    if not linears or "last_layer.weight_v" not in own:
        raise UserError(f"teacher checkpoint has no complete {prefix} (mlp layers and last_layer)")
    first, last = own[f"mlp.{linears[0]}.weight"], own[f"mlp.{linears[-1]}.weight"]
    head = DINOHead(first.shape[1], own["last_layer.weight_v"].shape[0], hidden_dim=first.shape[0],
                    bottleneck_dim=last.shape[0], nlayers=len(linears))
    try:
        head.load_state_dict(own, strict=True)
    except RuntimeError as exc:
        raise UserError(f"teacher {prefix} does not match a DINO head: {exc}") from exc
    return head


def _load_backbone_for(ckpt: Path):
    from pretrain.models.checkpoint import load_backbone, load_state_dict_any

    sibling = ckpt.parent / BACKBONE_NAME
    exact = {}
    if ckpt.name == CHECKPOINT_NAME and sibling.is_file():
        # What the shapes cannot show (head count, position-embedding resampling rule) comes from the
        # own-format sibling written with the checkpoint; the weights come from the checkpoint itself.
        cfg = load_state_dict_any(sibling)[1]["config"]
        exact = {k: cfg[k] for k in ("num_heads", "interpolate_offset", "interpolate_antialias") if k in cfg}
    return load_backbone(ckpt, drop_path_rate=0.0, **exact)


def load_teacher(path: str | Path, *, head_hidden_dim: int = 2048, head_bottleneck_dim: int = 256,
                 head_nlayers: int = 3, dino_prototypes: int = 65536, seed: int = 0,
                 heads: str = "auto") -> tuple[nn.ModuleDict, dict]:
    """(frozen teacher ModuleDict {backbone, dino_head[, ibot_head]}, info).

    `heads`: "auto" uses the checkpoint's trained heads when it has them; "fresh" always initialises new
    ones (seeded, with the given sizes), e.g. when the trained head has collapsed to uniform outputs but
    the backbone's features are still worth distilling."""
    if heads not in ("auto", "fresh"):
        raise UserError(f"teacher heads must be auto or fresh, got {heads!r}")
    ckpt = resolve_teacher_path(path)
    backbone = _load_backbone_for(ckpt)
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    sd = raw.get("teacher") if isinstance(raw, dict) and isinstance(raw.get("teacher"), dict) else raw
    has_heads = heads == "auto" and isinstance(sd, dict) and any(k.startswith("dino_head.") for k in sd)
    if has_heads:
        modules = {"dino_head": head_from_state_dict(sd, "dino_head")}
        if any(k.startswith("ibot_head.") for k in sd):
            modules["ibot_head"] = head_from_state_dict(sd, "ibot_head")
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            modules = {"dino_head": DINOHead(backbone.embed_dim, dino_prototypes, head_hidden_dim,
                                             head_bottleneck_dim, head_nlayers)}
    teacher = nn.ModuleDict({"backbone": backbone, **modules})
    freeze(teacher)
    info = {"path": str(ckpt), "heads": "trained" if has_heads else "initialised",
            "embed_dim": backbone.embed_dim, "depth": len(backbone.blocks), "patch_size": backbone.patch_size,
            "dino_prototypes": modules["dino_head"].out_dim, "ibot_separate_head": "ibot_head" in modules,
            "params": sum(p.numel() for p in teacher.parameters())}
    return teacher, info


def saved_centers(path: str | Path) -> dict[str, torch.Tensor]:
    """The centres a pretraining teacher's targets were softmax-centred with ({"dino", "ibot"} (1, K)
    tensors), saved with its `teacher_checkpoint.pth`; {} for files that have none (older exports, bare
    backbones, distilled students)."""
    raw = torch.load(resolve_teacher_path(path), map_location="cpu", weights_only=True)
    centers = raw.get("centers") if isinstance(raw, dict) else None
    return {k: v for k, v in (centers or {}).items() if isinstance(v, torch.Tensor)}


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()
