"""How a ViT's absolute position embedding meets an input whose patch grid differs from the model's.

Classification keeps timm's rule (bicubic, as timm resizes checkpoints and dynamic inputs).
Segmentation follows MMSegmentation's SETR (``interpolate_mode='bilinear'``): the checkpoint's
embedding is resized bilinearly to the crop's grid when it is loaded (MoCo v3's fixed sin-cos
table too, unless ``seg.sincos_pos_embed=rebuild``: see ``gapt/seg/model.py``), and a window
smaller than the crop (an image smaller than the crop in sliding-window inference) gets a bilinear
resize of that embedding too.
"""
from __future__ import annotations

import torch

from .checkpoints import resize_pos_embed

POS_EMBED_MODES = ("bicubic", "bilinear")


def check_mode(mode: str) -> str:
    if mode not in POS_EMBED_MODES:
        raise ValueError(f"position-embedding interpolation must be one of {list(POS_EMBED_MODES)}, got {mode!r}")
    return mode


def add_pos_embed(vit, x: torch.Tensor, mode: str) -> torch.Tensor:
    """timm ``VisionTransformer._pos_embed`` for (B, H, W, C) patch tokens, with the embedding
    resized by ``mode`` (no antialiasing) when (H, W) is not the model's grid; returns (B, prefix + H*W, C)."""
    b, h, w, c = x.shape
    n_pre = 0 if vit.no_embed_class else vit.num_prefix_tokens
    grid = tuple(vit.patch_embed.grid_size)
    pos = vit.pos_embed if (h, w) == grid else resize_pos_embed(vit.pos_embed, (h, w), n_pre, mode=mode, old_grid=grid)
    x = x.reshape(b, h * w, c)
    prefix = [t.expand(b, -1, -1) for t in (vit.cls_token, getattr(vit, "reg_token", None)) if t is not None]
    if vit.no_embed_class:  # the embedding covers patch tokens only
        x = torch.cat(prefix + [x + pos], dim=1)
    else:
        x = torch.cat(prefix + [x], dim=1) + pos
    return vit.pos_drop(x)


def regrid_pos_embed(vit, image_size: int, mode: str):
    """Set ``vit``'s input size to ``image_size``, resizing its position embedding by ``mode``
    (timm's own ``set_input_size`` resizes bicubically; its result is replaced)."""
    old, old_grid = vit.pos_embed.detach().clone(), tuple(vit.patch_embed.grid_size)
    vit.set_input_size(img_size=(image_size, image_size))
    grid = tuple(vit.patch_embed.grid_size)
    if grid != old_grid:
        n_pre = 0 if vit.no_embed_class else vit.num_prefix_tokens
        with torch.no_grad():
            vit.pos_embed.copy_(resize_pos_embed(old, grid, n_pre, mode=mode, old_grid=old_grid))
    return vit
