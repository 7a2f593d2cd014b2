"""Backbone registry: a name -> a timm VisionTransformer + the pooling rule of its pretraining.

Each entry knows the architecture and which checkpoint adapter reads its official files
(see ``checkpoints.py``). Any other timm ViT name works too (pooling from its timm config).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
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
    pooling: str                     # mean (MAE) | cls (MoCo v3, DINO, supervised) | mean_normed (I-JEPA)
    checkpoint_format: str           # mae | mocov3 | dino | timm | dinov2 | ijepa | dinov3 (the last 3: timm's filter)
    image_size: int = 224            # the resolution the checkpoint was trained at
    sincos_pos_embed: bool = False   # fixed 2-D sin-cos position embedding (MoCo v3)
    timm_name: Optional[str] = None  # hub weights for weights="timm"
    description: str = ""
    extra: Dict = field(default_factory=dict)
    family: str = "vit"              # vit (timm VisionTransformer) | eva (timm Eva: RoPE, e.g. DINOv3)
    download: str = ""               # the file users download, and from where (`gapt backbones`)


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

# The supervised ViT-B/16 of VPT and the paper's Figs. 1-2: Google's `imagenet21k_ViT-B_16.npz` (SPEC §11).
register_backbone(BackboneSpec(
    "sup_vitb16", _vit(16, 768, 12, 12), "cls", "google_npz", timm_name="vit_base_patch16_224.orig_in21k",
    description="supervised ImageNet-21k ViT-B/16, Google's .npz layout (VPT's imagenet21k_ViT-B_16.npz)"))


_FAIR = "https://dl.fbaipublicfiles.com/"
for _name, _file in [("mae_vitb16", "mae/pretrain/mae_pretrain_vit_base.pth"),
                     ("mae_vitl16", "mae/pretrain/mae_pretrain_vit_large.pth"),
                     ("mae_vith14", "mae/pretrain/mae_pretrain_vit_huge.pth"),
                     ("mocov3_vits16", "moco-v3/vit-s-300ep/vit-s-300ep.pth.tar"),
                     ("mocov3_vitb16", "moco-v3/vit-b-300ep/vit-b-300ep.pth.tar"),
                     ("dino_vitb16", "dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth")]:
    BACKBONES[_name] = replace(BACKBONES[_name], download=f"{_file.rsplit('/', 1)[1]} from {_FAIR}{_file}")
BACKBONES["mocov3_vitb16"] = replace(BACKBONES["mocov3_vitb16"], download=BACKBONES["mocov3_vitb16"].download + (
    f" (or the linear-probe file {_FAIR}moco-v3/vit-b-300ep/linear-vit-b-300ep.pth.tar that VPT and GaPT used)"))
BACKBONES["mae_vit_micro"] = replace(BACKBONES["mae_vit_micro"], download="ships with gapt (gapt/demo/assets)")
BACKBONES["sup_vitb16"] = replace(BACKBONES["sup_vitb16"], download=(
    "imagenet21k_ViT-B_16.npz: Google's ViT-B_16.npz from https://storage.googleapis.com/vit_models/imagenet21k/"
    "ViT-B_16.npz (VPT's name for it)"))

# What each checkpoint_format reads (`gapt backbones`).
LAYOUTS = {
    "mae": "MAE file {'model': encoder state dict}; decoder_* and mask_token dropped",
    "mocov3": "MoCo v3 file {'state_dict': module.base_encoder.*} or linear-probe module.*; momentum encoder, "
              "predictor and head dropped; sin-cos position embedding rebuilt",
    "dino": "DINO file: plain state dict, or {'teacher': backbone.*}",
    "timm": "timm state dict (.pth/.safetensors) through timm's checkpoint_filter_fn (DINOv2, I-JEPA, CLIP layouts)",
    "dinov2": "DINOv2 hub file: plain state dict with mask_token, register_tokens (reg), ls1/ls2.gamma, "
              "518-px position embedding; timm's checkpoint_filter_fn, then the strict key check",
    "ijepa": "I-JEPA training file {'encoder', 'predictor', 'target_encoder': module.*, 'opt', 'epoch', ...}: the "
             "target encoder (what the I-JEPA paper evaluates), or the context encoder ('encoder', what timm reads) "
             "for the *_context backbone; via timm's checkpoint_filter_fn",
    "google_npz": "Google ViT .npz (Transformer/encoderblock_i/...): timm's loader after a strict key check; "
                  "head/* and pre_logits/* dropped",
    "dinov3": "DINOv3 file: plain state dict with storage_tokens, mask_token, ls1/ls2.gamma, qkv.bias + "
              "bias_mask, rope_embed.periods; timm's Eva checkpoint_filter_fn",
}


def describe_backbones(include_tests: bool = False) -> str:
    """Every registered backbone: architecture, pooling, checkpoint layout, the file to download."""
    lines = []
    for name, spec in BACKBONES.items():
        if name.startswith("test_") and not include_tests:
            continue
        a = spec.arch
        kind = "Eva with RoPE" if spec.family == "eva" else "ViT"
        extra = [f"{a['reg_tokens']} registers"] if a.get("reg_tokens") else []
        extra += [f"{a['num_reg_tokens']} registers"] if a.get("num_reg_tokens") else []
        extra += ["no CLS token"] if a.get("class_token") is False else []
        lines.append(f"{name:18s} {kind} patch {a.get('patch_size', '?')}, width {a.get('embed_dim', '?')}, depth "
                     f"{a.get('depth', '?')}{''.join(', ' + e for e in extra)}; pre-trained at {spec.image_size} px")
        lines.append(f"    pooling:    {spec.pooling}")
        lines.append(f"    checkpoint: {spec.checkpoint_format}: {LAYOUTS.get(spec.checkpoint_format, '')}")
        lines.append(f"    download:   {spec.download or 'n/a'}")
        if spec.extra.get(IJEPA_ENCODER):
            which = spec.extra[IJEPA_ENCODER]
            lines.append(f"    encoder:    the file's '{which}'" + (
                " (the EMA target encoder, which I-JEPA evaluates: App. A.1)" if which == "target_encoder" else
                " (the context encoder, the one timm reads)"))
        if spec.timm_name and spec.extra.get(IJEPA_ENCODER) == "target_encoder":
            lines.append(f"    timm name:  {spec.timm_name} (architecture only: timm's hub copy is the context "
                         f"encoder; weights=timm is refused, use {spec.name}_context for it)")
        elif spec.timm_name:
            lines.append(f"    timm name:  {spec.timm_name} (weights=timm loads it from the hub when online)")
    lines.append("...or any timm ViT / Eva name, e.g. backbone=vit_base_patch14_reg4_dinov2 "
                 "weights=dinov2_vitb14_reg4_pretrain.pth (checkpoint: timm)")
    return "\n".join(lines)


# Backbones whose official files go through timm's own checkpoint_filter_fn (SPEC §11).
_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2/"
register_backbone(BackboneSpec(
    "dinov2_vitb14", dict(_vit(14, 768, 12, 12), init_values=1e-5), "cls", "dinov2", image_size=518,
    timm_name="vit_base_patch14_dinov2.lvd142m",
    description="DINOv2 ViT-B/14 (LVD-142M); position embedding 518 px (37x37) resized to the run's image_size",
    download=f"dinov2_vitb14_pretrain.pth from {_DINOV2}dinov2_vitb14/dinov2_vitb14_pretrain.pth"))
register_backbone(BackboneSpec(
    "dinov2_vitb14_reg", dict(_vit(14, 768, 12, 12), init_values=1e-5, reg_tokens=4, no_embed_class=True), "cls",
    "dinov2", image_size=518, timm_name="vit_base_patch14_reg4_dinov2.lvd142m",
    description="DINOv2 ViT-B/14 with 4 registers; prompts go after CLS + registers",
    download=f"dinov2_vitb14_reg4_pretrain.pth from {_DINOV2}dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"))
# I-JEPA's training file holds two encoders (src/train.py save_checkpoint): `encoder` (the context
# encoder, trained by the gradient) and `target_encoder` (its EMA). The paper evaluates the target
# encoder (I-JEPA, App. A.1), so ijepa_vith14 reads it; ijepa_vith14_context reads `encoder`, the one
# timm's checkpoint_filter_fn (and timm's hub copy) takes.
IJEPA_ENCODER = "ijepa_encoder"   # BackboneSpec.extra key: which encoder of an I-JEPA file to load
_IJEPA_DOWNLOAD = "IN1K-vit.h.14-300e.pth.tar from https://dl.fbaipublicfiles.com/ijepa/IN1K-vit.h.14-300e.pth.tar"
register_backbone(BackboneSpec(
    "ijepa_vith14", dict(_vit(14, 1280, 32, 16), class_token=False, global_pool="avg"), "mean_normed", "ijepa",
    timm_name="vit_huge_patch14_gap_224.in1k_ijepa",
    description="I-JEPA ViT-H/14 (ImageNet-1k, 300 ep); no CLS token: mean of the normalised tokens; "
                "the file's `target_encoder` (the encoder I-JEPA evaluates)",
    extra={IJEPA_ENCODER: "target_encoder"}, download=_IJEPA_DOWNLOAD))
register_backbone(BackboneSpec(
    "ijepa_vith14_context", dict(_vit(14, 1280, 32, 16), class_token=False, global_pool="avg"), "mean_normed",
    "ijepa", timm_name="vit_huge_patch14_gap_224.in1k_ijepa",
    description="I-JEPA ViT-H/14, the file's context encoder `encoder` (what timm reads; weights=timm is timm's copy)",
    extra={IJEPA_ENCODER: "encoder"}, download=_IJEPA_DOWNLOAD))
register_backbone(BackboneSpec(
    "dinov3_vitb16", dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, qkv_bias=False, init_values=1e-5,
                          rope_type="dinov3", rope_temperature=100, rope_rotate_half=True, use_rot_pos_emb=True,
                          use_abs_pos_emb=False, num_reg_tokens=4, use_fc_norm=False,
                          norm_layer=partial(nn.LayerNorm, eps=1e-5)), "cls", "dinov3", image_size=256,
    timm_name="vit_base_patch16_dinov3.lvd1689m", family="eva",
    description="DINOv3 ViT-B/16 (LVD-1689M, distilled): timm Eva with RoPE, CLS + 4 registers, LayerScale; "
                "prompts are prefix tokens without rotary embedding",
    download="dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth: request access at "
             "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/ (URL sent by e-mail)"))


def suggest_backbone(name: str) -> Optional[str]:
    """The closest registered backbone name, else the closest name in timm's own model list
    (``timm.list_models()``, with the pretrained tag kept apart), or None: the did-you-mean of
    an unknown backbone."""
    import difflib
    close = difflib.get_close_matches(name, list(BACKBONES), n=1, cutoff=0.6)
    if close:
        return close[0]
    import timm
    arch, dot, tag = name.partition(".")
    close = difflib.get_close_matches(arch, timm.list_models(), n=1, cutoff=0.6)
    return close[0] + dot + tag if close and close[0] != arch else None


def resolve_spec(backbone: str) -> BackboneSpec:
    if backbone in BACKBONES:
        return BACKBONES[backbone]
    import timm
    if timm.is_model(backbone) or timm.is_model(backbone.split(".")[0]):
        return BackboneSpec(backbone, {}, pooling="", checkpoint_format="timm", timm_name=backbone)
    close = suggest_backbone(backbone)
    hint = f" (did you mean '{close}'?)" if close else ""
    raise ValueError(f"unknown backbone '{backbone}'{hint}; valid: {sorted(BACKBONES)} or any timm ViT name "
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
    if pretrained_timm and spec.extra.get(IJEPA_ENCODER) == "target_encoder":
        raise ValueError(f"backbone '{spec.name}' reads I-JEPA's target encoder, but timm's hub weights "
                         f"({spec.timm_name}) are its context encoder (timm loads the file's 'encoder'): give the "
                         f"I-JEPA file as weights, or use backbone={spec.name}_context with weights=timm")
    if (spec.checkpoint_format == "timm" and not spec.arch) or pretrained_timm:  # hub weights: timm's own model
        import timm
        kw = dict(common)
        if image_size:
            kw["img_size"] = image_size
        try:
            vit = timm.create_model(spec.timm_name, pretrained=pretrained_timm, **kw)
        except TypeError:  # a ViT variant (or an Eva) that rejects one of the kwargs
            vit = timm.create_model(spec.timm_name, pretrained=pretrained_timm, num_classes=0,
                                    **({"img_size": image_size} if image_size else {}))
        from timm.models.eva import Eva
        if not isinstance(vit, (VisionTransformer, Eva)):
            raise ValueError(f"timm model '{spec.timm_name}' is a {type(vit).__name__}, not a VisionTransformer "
                             "or an Eva")
        return vit
    img = image_size or spec.image_size
    if spec.family == "eva":
        from timm.models.eva import Eva
        eva_common = dict(num_classes=0, global_pool="token", use_fc_norm=False, dynamic_img_size=True,
                          drop_rate=0.0, drop_path_rate=0.0, attn_drop_rate=0.0, proj_drop_rate=0.0)
        return Eva(img_size=img, **{**eva_common, **spec.arch})
    vit = VisionTransformer(img_size=img, norm_layer=partial(nn.LayerNorm, eps=1e-6), **{**common, **spec.arch})
    if spec.sincos_pos_embed:
        gh, gw = vit.patch_embed.grid_size
        vit.pos_embed = nn.Parameter(sincos_pos_embed_2d(gh, gw, vit.embed_dim), requires_grad=False)
    if spec.extra.get(IJEPA_ENCODER):  # read by checkpoints.filter_with_timm: which encoder of an I-JEPA file
        vit.ijepa_encoder = spec.extra[IJEPA_ENCODER]
    return vit


def default_pooling(spec: BackboneSpec, vit: VisionTransformer) -> str:
    if spec.pooling:
        return spec.pooling
    if getattr(vit, "cls_token", None) is None:  # no CLS token (I-JEPA layout): timm's average pooling
        return "mean_normed"
    name = (spec.timm_name or "").lower()
    return "mean" if (".mae" in name or "mae" in name.split(".")[-1]) else "cls"
