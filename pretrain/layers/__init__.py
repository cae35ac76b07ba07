"""Building blocks of the ViT backbone, with the official DINOv2 parameter names."""

from pretrain.layers.attention import Attention, attention, xformers_available
from pretrain.layers.block import Block
from pretrain.layers.drop_path import DropPath, drop_add_residual_subset, drop_path
from pretrain.layers.ffn import FFN_LAYERS, Mlp, SwiGLUFFN, swiglu_hidden, use_gelu_epilogue
from pretrain.layers.layer_scale import LayerScale
from pretrain.layers.patch_embed import PatchEmbed

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "FFN_LAYERS",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "SwiGLUFFN",
    "attention",
    "drop_add_residual_subset",
    "drop_path",
    "swiglu_hidden",
    "use_gelu_epilogue",
    "xformers_available",
]
