"""The ViT backbone shared by embedding, DINOv2 training and distillation.

A re-implementation of the DINOv2 `DinoVisionTransformer` with the same parameter names and the same
`forward_features` outputs, so official checkpoints load 1:1 and code written for DINOv2 runs unchanged:

    model = build_vit("vit_large", patch_size=14, img_size=224)
    out = model.forward_features(images)            # images: (B, 3, H, W), H and W multiples of the patch
    out["x_norm_clstoken"]      # (B, D)       image embedding
    out["x_norm_regtokens"]     # (B, R, D)    register tokens (R = 0 unless num_register_tokens > 0)
    out["x_norm_patchtokens"]   # (B, H/p * W/p, D)
    out["x_prenorm"]            # (B, 1 + R + HW/p^2, D) before the final LayerNorm
    out["masks"]                # the masks passed in (or None)

- Token order is [CLS, registers..., patches...]. Registers carry no position embedding (added after it).
- `masks` (B, HW/p^2) bool replaces masked patch tokens by the learned `mask_token` before the position
  embedding is added (iBOT).
- A list of image batches (multi-crop, e.g. 2 global crops at 224 and 8 local crops at 98) may be passed
  instead of one tensor, with a list of masks (or None); the result is then a list of dicts.
- Position embeddings are learned for the `img_size / patch` grid and resampled (bicubic) for any other
  input size, following DINOv2 exactly: plain models scale by (grid + 0.1) / stored grid (the legacy
  `interpolate_offset`), register models resize to the exact grid with antialiasing. Checkpoint loading
  sets these per source format (see pretrain/models/checkpoint.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.layers import Block, LayerScale, PatchEmbed, swiglu_hidden


@dataclass(frozen=True)
class ViTConfig:
    """Everything needed to rebuild a backbone; stored in this project's checkpoints as a plain dict."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = 14
    img_size: int = 224  # the side of the position-embedding grid times the patch size
    in_chans: int = 3
    ffn_layer: str = "mlp"  # "mlp" (GELU) or "swiglu"
    ffn_hidden: int = 0  # 0: derived from mlp_ratio (4x for MLP, DINOv2's 2/3 rule for SwiGLU)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    init_values: float | None = 1e-5  # LayerScale start; None: no LayerScale
    num_register_tokens: int = 0
    # None: DINOv2's rule, (0.1, False) for plain models and (0.0, True) for register models.
    interpolate_offset: float | None = None
    interpolate_antialias: bool | None = None
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = True  # DINOv2 default: the same rate in every block
    norm_eps: float = 1e-6

    def resolved(self) -> "ViTConfig":
        """Fill the derived fields (FFN width, interpolation rule)."""
        hidden = self.ffn_hidden or (
            swiglu_hidden(self.embed_dim, self.mlp_ratio)
            if self.ffn_layer == "swiglu"
            else int(self.embed_dim * self.mlp_ratio)
        )
        regs = self.num_register_tokens > 0
        offset = self.interpolate_offset if self.interpolate_offset is not None else (0.0 if regs else 0.1)
        antialias = self.interpolate_antialias if self.interpolate_antialias is not None else regs
        return replace(self, ffn_hidden=hidden, interpolate_offset=offset, interpolate_antialias=antialias)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ViTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ViT config fields: {sorted(unknown)}")
        return cls(**d)


# Widths/depths/heads. Every size uses 64-dim heads, as DINOv2's do (vit_giant2 is "close to ViT-g" with
# 24 heads of 64). Note timm's ViT-H/14 uses 16 heads of 80: load such weights with num_heads=16.
ARCHS: dict[str, dict[str, Any]] = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_huge": dict(embed_dim=1280, depth=32, num_heads=20),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24),
}


def vit_config(arch: str, **overrides: Any) -> ViTConfig:
    if arch not in ARCHS:
        raise ValueError(f"unknown ViT architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return ViTConfig(**{**ARCHS[arch], **overrides})


class VisionTransformer(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        cfg = config.resolved()
        self.config = cfg
        d = cfg.embed_dim
        self.embed_dim = self.num_features = d
        self.patch_size = cfg.patch_size
        self.num_heads = cfg.num_heads
        self.n_blocks = cfg.depth
        self.num_register_tokens = cfg.num_register_tokens
        self.interpolate_offset = cfg.interpolate_offset
        self.interpolate_antialias = cfg.interpolate_antialias

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, d)
        grid = cfg.img_size // cfg.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, d))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, cfg.num_register_tokens, d)) if cfg.num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, d))

        if cfg.drop_path_uniform:
            rates = [cfg.drop_path_rate] * cfg.depth
        else:
            rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(
                d,
                cfg.num_heads,
                cfg.ffn_hidden,
                ffn_layer=cfg.ffn_layer,
                qkv_bias=cfg.qkv_bias,
                proj_bias=cfg.proj_bias,
                ffn_bias=cfg.ffn_bias,
                init_values=cfg.init_values,
                drop_path=r,
                norm_eps=cfg.norm_eps,
            )
            for r in rates
        )
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.head = nn.Identity()  # DINOv2 API: forward() returns head(cls token)
        self.init_weights()

    # ---- initialisation -------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """Initialise every parameter (DINOv2's scheme), so a model built on the meta device and
        materialised with `to_empty` (the FSDP2 way) needs only this call."""
        self.patch_embed.proj.reset_parameters()  # PyTorch's conv default, as in DINOv2
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, LayerScale):
                m.reset_parameters()

    # ---- tokens ---------------------------------------------------------------------------------------
    def interpolate_pos_encoding(self, x: Tensor, h: int, w: int) -> Tensor:
        """Position embeddings (1, 1 + h/p * w/p, D) for an h x w input (DINOv2's resampling rules)."""
        npatch = x.shape[1] - 1
        n = self.pos_embed.shape[1] - 1
        if npatch == n and h == w:
            return self.pos_embed
        dtype = x.dtype
        pos = self.pos_embed.float()
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        h0, w0 = h // self.patch_size, w // self.patch_size
        m = int(math.sqrt(n))
        grid = patch_pos.reshape(1, m, m, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            # Legacy DINO kludge kept for checkpoint compatibility: scale factors slightly above the ratio
            # (interpolate then derives the output size from them).
            sy = (h0 + self.interpolate_offset) / m
            sx = (w0 + self.interpolate_offset) / m
            grid = F.interpolate(
                grid, scale_factor=(sy, sx), mode="bicubic", antialias=self.interpolate_antialias
            )
        else:
            grid = F.interpolate(grid, size=(h0, w0), mode="bicubic", antialias=self.interpolate_antialias)
        if grid.shape[-2:] != (h0, w0):
            raise RuntimeError(f"position embedding resampled to {tuple(grid.shape[-2:])}, wanted {(h0, w0)}")
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)
        return torch.cat((cls_pos, patch_pos), dim=1).to(dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        _, _, h, w = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        # The token stream keeps the patch embedding's dtype: under bf16 autocast it is bf16 end to end
        # (as with bf16 parameters under FSDP2): CLS token, position embeddings and LayerScale gains are cast
        # to it. The official code adds them in float32, which promotes its stream to float32 under autocast;
        # in float32 the two are bit-identical.
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, h, w).to(x.dtype)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(x.shape[0], -1, -1).to(x.dtype)
            x = torch.cat((x[:, :1], regs, x[:, 1:]), dim=1)
        return x

    # ---- outputs --------------------------------------------------------------------------------------
    def _output(self, x: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward_features_list(self, xs: list[Tensor], masks_list: list[Tensor | None] | None = None) -> list[dict]:
        masks_list = list(masks_list) if masks_list is not None else [None] * len(xs)
        if len(masks_list) != len(xs):
            raise ValueError(f"{len(xs)} crop groups but {len(masks_list)} masks")
        tokens = [self.prepare_tokens_with_masks(x, m) for x, m in zip(xs, masks_list)]
        for blk in self.blocks:
            tokens = blk(tokens)
        return [self._output(t, m) for t, m in zip(tokens, masks_list)]

    def forward_features(self, x: Tensor | list[Tensor], masks: Tensor | list | None = None):
        """The DINOv2 output dict for a batch (or a list of dicts for a list of batches)."""
        if isinstance(x, (list, tuple)):
            return self.forward_features_list(list(x), masks)
        t = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            t = blk(t)
        return self._output(t, masks)

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | list[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Patch tokens (and optionally CLS) of the last `n` blocks, or of the block indices in `n`."""
        t = self.prepare_tokens_with_masks(x)
        wanted = set(range(len(self.blocks) - n, len(self.blocks)) if isinstance(n, int) else n)
        outs = []
        for i, blk in enumerate(self.blocks):
            t = blk(t)
            if i in wanted:
                outs.append(t)
        if len(outs) != len(wanted):
            raise ValueError(f"only {len(outs)} of the {len(wanted)} requested layers exist")
        if norm:
            outs = [self.norm(o) for o in outs]
        cls = [o[:, 0] for o in outs]
        patches = [o[:, 1 + self.num_register_tokens :] for o in outs]
        if reshape:
            b, _, h, w = x.shape
            p = self.patch_size
            patches = [o.reshape(b, h // p, w // p, -1).permute(0, 3, 1, 2).contiguous() for o in patches]
        return tuple(zip(patches, cls)) if return_class_token else tuple(patches)

    def forward(self, *args: Any, is_training: bool = False, **kwargs: Any):
        """Like DINOv2: the feature dict when `is_training`, else head(CLS) (the head is the identity)."""
        ret = self.forward_features(*args, **kwargs)
        if is_training:
            return ret
        return self.head(ret["x_norm_clstoken"])


def build_vit(arch: str | ViTConfig = "vit_base", **overrides: Any) -> VisionTransformer:
    """Build a backbone from a preset name (see ARCHS) or a ViTConfig, with field overrides.

    build_vit("vit_huge", patch_size=14, img_size=224)
    build_vit("vit_large", num_register_tokens=4, ffn_layer="swiglu", drop_path_rate=0.4)
    """
    cfg = replace(arch, **overrides) if isinstance(arch, ViTConfig) else vit_config(arch, **overrides)
    return VisionTransformer(cfg)


def vit_small(**kw: Any) -> VisionTransformer:
    return build_vit("vit_small", **kw)


def vit_base(**kw: Any) -> VisionTransformer:
    return build_vit("vit_base", **kw)


def vit_large(**kw: Any) -> VisionTransformer:
    return build_vit("vit_large", **kw)


def vit_huge(**kw: Any) -> VisionTransformer:
    return build_vit("vit_huge", **kw)


def vit_giant2(**kw: Any) -> VisionTransformer:
    return build_vit("vit_giant2", **kw)


def vit_tiny(**kw: Any) -> VisionTransformer:
    return build_vit("vit_tiny", **kw)
