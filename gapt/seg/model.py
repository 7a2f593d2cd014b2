"""Building, saving and loading the segmentation model: the prompted encoder of a config (position
embeddings at ``seg.crop_size``) with SETR-PUP heads (:mod:`gapt.seg.head`), its tuned state, and the
tuned file (safetensors + the metadata that rebuilds the model, the backbone's checksum).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .. import config as C
from ..method import MethodSettings
from ..model.tuned import SEG_FORMAT, read_safetensors_metadata
from .head import SegmentationModel
from .recipe import HEAD_CHANNELS

log = logging.getLogger("gapt")

TUNED_FORMAT = SEG_FORMAT  # defined beside the classification format: analyses read both
REFERENCE_DEPTH, REFERENCE_AUX_BLOCKS = 12, (5, 9)   # the paper's ViT-B choice (SPEC §6)
SEG_POS_EMBED_INTERPOLATION = "bilinear"   # MMSegmentation SETR's interpolate_mode (classification: bicubic)
SINCOS_MODES = ("interpolate", "rebuild")   # seg.sincos_pos_embed


def sincos_mode(cfg: C.RunConfig) -> Optional[str]:
    """``seg.sincos_pos_embed`` for a backbone with a fixed sin-cos position embedding (MoCo v3), else None.

    ``interpolate`` (the recipe's, MMSegmentation's): the checkpoint's table (14x14 for MoCo's 224 px)
    is resized bilinearly to the crop's grid, as MMSegmentation's ViT does with any checkpoint's
    ``pos_embed`` (``VisionTransformer.init_weights`` -> ``resize_pos_embed``, SETR's
    ``interpolate_mode='bilinear'``). ``rebuild``: MoCo v3's formula evaluated at the crop's grid
    (32x32 at 512), as MoCo's own code builds the table at any size.
    """
    from ..model.backbones import BACKBONES
    spec = BACKBONES.get(cfg.backbone)
    if spec is None or not spec.sincos_pos_embed:
        return None
    if cfg.seg.sincos_pos_embed not in SINCOS_MODES:
        raise C.ConfigError(f"bad value for config key 'seg.sincos_pos_embed': {cfg.seg.sincos_pos_embed!r}; "
                            f"valid: {list(SINCOS_MODES)}")
    return cfg.seg.sincos_pos_embed


def aux_blocks_for_depth(depth: int) -> Tuple[int, ...]:
    """Auxiliary-head blocks (1-based): (5, 9) for 12 blocks, the same relative depths otherwise.

    Block b of 12 maps to round(b * depth / 12), clamped to 1..depth, duplicates merged:
    4 blocks -> (2, 3), 6 -> (3, 5), 24 -> (10, 18), 32 -> (13, 24).
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    out: List[int] = []
    for b in REFERENCE_AUX_BLOCKS:
        k = min(max(int(math.floor(b * depth / REFERENCE_DEPTH + 0.5)), 1), depth)
        if k not in out:
            out.append(k)
    return tuple(out)


def build_seg_model(cfg: C.RunConfig, num_classes: int, class_names: Optional[List[str]] = None,
                    aux_blocks: Optional[Tuple[int, ...]] = None, channels: Optional[int] = None) -> SegmentationModel:
    """The prompted encoder of ``cfg`` (position embeddings at ``seg.crop_size``) with SETR-PUP heads.

    The encoder's classification head is replaced by an identity: it would be an unused
    trainable tensor (DDP would need find_unused_parameters) and is not part of the tuned state;
    for the same reason the backbone's final norm stays frozen under ``method: full``.
    With ``weights: null`` the random backbone depends only on ``train.seed`` (as in classification).
    ``channels`` of the heads: SETR's 256 (``HEAD_CHANNELS``) unless given.
    """
    from ..model import build_model
    from ..model.backbones import resolve_spec
    sincos = sincos_mode(cfg)
    backbone = cfg.backbone
    if sincos == "interpolate":  # no table of the model's own: the checkpoint's is resized to the crop's grid
        backbone = replace(resolve_spec(cfg.backbone), sincos_pos_embed=False)
    with warnings.catch_warnings():
        if cfg.weights is None:
            warnings.simplefilter("ignore")
        encoder = build_model(backbone, MethodSettings.of(cfg), num_classes=num_classes, weights=cfg.weights,
                              image_size=cfg.seg.crop_size, class_names=class_names, random_seed=cfg.train.seed,
                              pos_embed_interpolation=SEG_POS_EMBED_INTERPOLATION)
    if sincos == "interpolate":
        _fixed_sincos_table(encoder.backbone, resolve_spec(cfg.backbone), from_formula=cfg.weights is None)
    encoder.head = nn.Identity()
    encoder.backbone.norm.requires_grad_(False)  # the heads read tokens before the final norm (method full)
    encoder.grad_checkpointing = cfg.train.grad_checkpointing
    blocks = aux_blocks_for_depth(encoder.depth) if aux_blocks is None else tuple(aux_blocks)
    model = SegmentationModel(encoder, num_classes, aux_blocks=blocks, channels=channels or HEAD_CHANNELS)
    model.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    return model


def _fixed_sincos_table(vit: nn.Module, spec, from_formula: bool) -> None:
    """MoCo v3's table stays fixed (not trained, as in MoCo). Without a checkpoint (a random
    backbone), the table a checkpoint holds (MoCo's formula at its pre-training grid, 14x14) is
    resized bilinearly as a checkpoint's would be."""
    if from_formula:
        from ..model.backbones import sincos_pos_embed_2d
        from ..model.checkpoints import resize_pos_embed
        side = spec.image_size // int(spec.arch["patch_size"])
        table = sincos_pos_embed_2d(side, side, vit.embed_dim)
        with torch.no_grad():
            vit.pos_embed.copy_(resize_pos_embed(table, tuple(vit.patch_embed.grid_size), 1,
                                                 mode=SEG_POS_EMBED_INTERPOLATION))
    vit.pos_embed.requires_grad_(False)


def seg_tuned_state(model: SegmentationModel) -> Dict[str, torch.Tensor]:
    """What training changes: the encoder's trainable tensors and every head tensor (BN statistics included)."""
    frozen = {f"encoder.{n}" for n, p in model.encoder.named_parameters() if not p.requires_grad}
    frozen |= {f"encoder.{n}" for n, _ in model.encoder.named_buffers()}
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k not in frozen}


def set_seg_tuned_state(model: SegmentationModel, state: Dict[str, torch.Tensor], source: str = "<state>") -> None:
    own = seg_tuned_state(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        from ..model.checkpoints import CheckpointError
        raise CheckpointError(f"{source} does not fit this segmentation model: missing {missing}, unexpected "
                              f"{unexpected}, mis-shaped {shapes}")
    model.load_state_dict({k: state[k] for k in own}, strict=False)


def backbone_checksum(model: SegmentationModel) -> str:
    """SHA-256 of the frozen encoder tensors: tells whether a tuned file meets the backbone it was trained on."""
    h = hashlib.sha256()
    for name, p in sorted(model.encoder.named_parameters()):
        if not p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def seg_identity(cfg: C.RunConfig, model: SegmentationModel) -> Dict:
    enc = model.encoder
    return {"backbone": enc.backbone_name, **enc.settings.as_dict(), "crop_size": cfg.seg.crop_size,
            "sincos_pos_embed": sincos_mode(cfg),
            "num_classes": model.num_classes, "class_names": model.class_names, "aux_blocks": list(model.aux_blocks),
            "channels": model.decode_head.conv_seg.in_channels, "depth": enc.depth, "embed_dim": enc.embed_dim}


def save_seg_tuned(path, cfg: C.RunConfig, model: SegmentationModel, extra: Optional[Dict] = None) -> None:
    """safetensors with the tuned state and, as metadata, what is needed to rebuild the model."""
    from .. import __version__
    from ..model.tuned import write_safetensors
    tensors = {k: v.contiguous() for k, v in seg_tuned_state(model).items()}
    meta = {"format": TUNED_FORMAT, "gapt_version": __version__, "config": json.dumps(seg_identity(cfg, model)),
            "backbone_checksum": backbone_checksum(model), "weights": json.dumps(cfg.weights)}
    if extra:
        meta["extra"] = json.dumps(extra)
    write_safetensors(tensors, path, meta)


def read_seg_tuned(path) -> Tuple[Dict, Dict[str, torch.Tensor]]:
    """(metadata with ``config`` decoded, tensors) of a segmentation tuned file."""
    from safetensors.torch import load_file
    from ..model.checkpoints import CheckpointError
    p = Path(path)
    meta = read_safetensors_metadata(p, "segmentation tuned file")
    if meta.get("format") != TUNED_FORMAT or "config" not in meta:
        raise CheckpointError(f"{path} is not a gapt segmentation tuned file (metadata format="
                              f"{meta.get('format')!r}); classification runs are read by `gapt eval`")
    meta["config"] = json.loads(meta["config"])
    meta["extra"] = json.loads(meta["extra"]) if "extra" in meta else {}
    return meta, load_file(str(p))


def config_from_identity(cfg: C.RunConfig, ident: Dict) -> C.RunConfig:
    held = MethodSettings.of(ident, num_prompts=ident["num_prompts"] or cfg.num_prompts).as_dict()
    held.pop("prompt_init")  # how training started, not part of the model
    # a file written before seg.sincos_pos_embed existed was trained on the rebuilt table
    sincos = ident.get("sincos_pos_embed", "rebuild") or cfg.seg.sincos_pos_embed
    return replace(cfg, backbone=ident["backbone"], seg=replace(cfg.seg, crop_size=ident["crop_size"],
                                                                sincos_pos_embed=sincos), **held)


def load_seg_model(tuned_path, cfg: Optional[C.RunConfig] = None, weights: Optional[str] = "__file__"
                   ) -> Tuple[SegmentationModel, Dict]:
    """Rebuild a segmentation model from its tuned file (+ ``cfg`` for anything not stored) and load it.

    ``weights``: the backbone checkpoint; by default the one recorded in the file. A random
    backbone (``weights: null``) is rebuilt from ``cfg.train.seed`` exactly as training built it;
    a backbone whose checksum differs from the training one is reported with a warning.
    """
    meta, tensors = read_seg_tuned(tuned_path)
    ident = meta["config"]
    cfg = cfg or C.RunConfig()
    if weights == "__file__":
        weights = json.loads(meta.get("weights", "null"))
    cfg = replace(config_from_identity(cfg, ident), weights=weights)
    model = build_seg_model(cfg, ident["num_classes"], ident["class_names"], aux_blocks=tuple(ident["aux_blocks"]),
                            channels=ident["channels"])
    set_seg_tuned_state(model, tensors, str(tuned_path))
    held = meta.get("backbone_checksum")
    if held and held != backbone_checksum(model):
        msg = (f"{tuned_path} was trained on a backbone whose weights differ from the ones loaded now "
               f"(weights={weights!r}); its predictions will not match the run's")
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
    return model.eval(), meta
