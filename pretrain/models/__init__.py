"""Backbones and checkpoint interop: `build_vit`, `load_backbone`, `save_backbone`, `export_official`."""

from pretrain.models.checkpoint import export_official, load_backbone, load_state_dict_any, save_backbone
from pretrain.models.flops import vit_forward_flops
from pretrain.models.vit import (
    ARCHS,
    VisionTransformer,
    ViTConfig,
    build_vit,
    vit_base,
    vit_config,
    vit_giant2,
    vit_huge,
    vit_large,
    vit_small,
    vit_tiny,
)

__all__ = [
    "ARCHS",
    "VisionTransformer",
    "ViTConfig",
    "build_vit",
    "export_official",
    "load_backbone",
    "load_state_dict_any",
    "save_backbone",
    "vit_base",
    "vit_config",
    "vit_forward_flops",
    "vit_giant2",
    "vit_huge",
    "vit_large",
    "vit_small",
    "vit_tiny",
]
