"""Backbone registry: a name -> a timm VisionTransformer + the pooling rule of its pretraining.

Each entry knows the architecture and which checkpoint adapter reads its official files
(see ``checkpoints.py``). Any other timm ViT name works too (pooling from its timm config).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, Optional

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

log = logging.getLogger("gapt")


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    arch: Dict                       # VisionTransformer kwargs (img_size is set at build time)
    pooling: str                     # mean (MAE) | cls (MoCo v3, DINO, supervised)
    checkpoint_format: str           # mae | mocov3 | dino | timm
    image_size: int = 224            # the resolution the checkpoint was trained at
    sincos_pos_embed: bool = False   # fixed 2-D sin-cos position embedding (MoCo v3)
    timm_name: Optional[str] = None  # hub weights for weights="timm"
    description: str = ""
    extra: Dict = field(default_factory=dict)


def _vit(patch, dim, depth, heads):
    return dict(patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4.0, qkv_bias=True)


BACKBONES: Dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone name (tests and users register their own small ViTs this way)."""
    BACKBONES[spec.name] = spec
    return spec


for _name, _arch, _fmt, _pool, _timm, _sincos in [
    ("mae_vitb16", _vit(16, 768, 12, 12), "mae", "mean", "vit_base_patch16_224.mae", False),
    ("mae_vitl16", _vit(16, 1024, 24, 16), "mae", "mean", "vit_large_patch16_224.mae", False),
    ("mae_vith14", _vit(14, 1280, 32, 16), "mae", "mean", "vit_huge_patch14_224.mae", False),
    ("mocov3_vits16", _vit(16, 384, 12, 12), "mocov3", "cls", None, True),
    ("mocov3_vitb16", _vit(16, 768, 12, 12), "mocov3", "cls", None, True),
    ("dino_vitb16", _vit(16, 768, 12, 12), "dino", "cls", "vit_base_patch16_224.dino", False),
]:
    register_backbone(BackboneSpec(_name, _arch, _pool, _fmt, 224, _sincos, _timm))

# The small MAE-pretrained ViT shipped with the package for `gapt demo` (32x32 images).
register_backbone(BackboneSpec(
    "mae_vit_micro", _vit(4, 64, 6, 4), "mean", "mae", image_size=32,
    description="6-block, width-64 ViT pre-trained with MAE on procedural images; ships in gapt/demo/assets"))


def resolve_spec(backbone: str) -> BackboneSpec:
    if backbone in BACKBONES:
        return BACKBONES[backbone]
    import timm
    if timm.is_model(backbone) or timm.is_model(backbone.split(".")[0]):
        return BackboneSpec(backbone, {}, pooling="", checkpoint_format="timm", timm_name=backbone)
    raise ValueError(f"unknown backbone '{backbone}'; valid: {sorted(BACKBONES)} or any timm ViT name "
                     f"(e.g. vit_base_patch16_224.mae)")


def sincos_pos_embed_2d(grid_h: int, grid_w: int, dim: int, num_prefix: int = 1,
                        temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's fixed position embedding, zeros for CLS; token order row-major (timm's).

    MoCo v3 (``vits.py``) builds ``meshgrid(grid_w, grid_h)`` in 'ij' order and flattens it,
    so its first half of the channels (sin/cos of what it calls ``out_w``) follows the token's
    row and the second half its column. For the square grids MoCo trained on this is exactly
    its formula; for a non-square grid we keep that meaning (first half: row).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float32),
                                torch.arange(grid_w, dtype=torch.float32), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    by_row = rows.flatten()[:, None] * omega[None]
    by_col = cols.flatten()[:, None] * omega[None]
    pe = torch.cat([by_row.sin(), by_row.cos(), by_col.sin(), by_col.cos()], dim=1)
    return torch.cat([torch.zeros(num_prefix, dim), pe], dim=0)[None]


def create_vit(spec: BackboneSpec, image_size: Optional[int] = None, pretrained_timm: bool = False) -> VisionTransformer:
    """An un-headed timm ViT whose final ``norm`` is a LayerNorm (the pooling applies it)."""
    common = dict(num_classes=0, global_pool="token", fc_norm=False, dynamic_img_size=True,
                  drop_rate=0.0, drop_path_rate=0.0, attn_drop_rate=0.0, proj_drop_rate=0.0)
    if spec.checkpoint_format == "timm" and not spec.arch:
        import timm
        kw = dict(common)
        if image_size:
            kw["img_size"] = image_size
        try:
            vit = timm.create_model(spec.timm_name, pretrained=pretrained_timm, **kw)
        except TypeError:  # a ViT variant that rejects one of the kwargs
            vit = timm.create_model(spec.timm_name, pretrained=pretrained_timm, num_classes=0)
        if not isinstance(vit, VisionTransformer):
            raise ValueError(f"timm model '{spec.timm_name}' is a {type(vit).__name__}, not a VisionTransformer")
        return vit
    img = image_size or spec.image_size
    vit = VisionTransformer(img_size=img, norm_layer=partial(nn.LayerNorm, eps=1e-6), **spec.arch, **common)
    if spec.sincos_pos_embed:
        gh, gw = vit.patch_embed.grid_size
        vit.pos_embed = nn.Parameter(sincos_pos_embed_2d(gh, gw, vit.embed_dim), requires_grad=False)
    return vit


def default_pooling(spec: BackboneSpec, vit: VisionTransformer) -> str:
    if spec.pooling:
        return spec.pooling
    name = (spec.timm_name or "").lower()
    return "mean" if (".mae" in name or "mae" in name.split(".")[-1]) else "cls"
