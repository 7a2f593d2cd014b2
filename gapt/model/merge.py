"""Folding a method into the frozen weights: ``merge(model)`` returns a plain timm ViT with its head.

LoRA (W + (alpha / r) B A), SSF (diag(gamma) W, gamma b + beta) and BitFit / full tuning (the backbone's
own tensors) fold exactly, so the merged model runs at the backbone's own speed with no extra
module; prompts, gates, temperatures and adapters cannot, and ``merge`` says which part and why
in one line. The merged model is timm's own class (VisionTransformer, or Eva) whose ``forward``
gives the tuned model's logits: its pooling is set to gapt's (``cls``: timm's token pooling;
``mean``: timm's average pooling with the final norm moved after the pool as ``fc_norm``;
``mean_normed``: the norm, then the average).
"""
from __future__ import annotations

import copy
import json
from typing import Dict, Optional

import torch
import torch.nn as nn

from .parts import NotMergeable, fold, strip

FORMAT = "gapt-merged"


def _set_pooling(vit: nn.Module, pooling: str, num_prompts: int = 0) -> None:
    """Make timm's own ``forward_head`` pool as gapt's ``PromptedViT.pool`` does (no prompts in the sequence)."""
    if pooling == "cls":
        vit.global_pool = "token"
        vit.fc_norm = nn.Identity()
    elif pooling in ("mean", "img") and not num_prompts:  # norm(mean of the patch tokens)
        vit.global_pool = "avg"
        vit.fc_norm, vit.norm = vit.norm, nn.Identity()
    elif pooling == "mean_normed":  # mean(norm(patch tokens)): timm's avg with the norm before the pool
        vit.global_pool = "avg"
        vit.fc_norm = nn.Identity()
    else:
        raise NotMergeable(f"pooling='{pooling}' reads prompt tokens, which a plain timm ViT does not have")


def timm_classifier(model, merged: bool = True) -> nn.Module:
    """A copy of ``model``'s backbone as a timm classifier (images in, logits out) with a copy of its head.

    ``merged=True``: every part folded into the weights (see :func:`merge`, which checks they all fold).
    ``merged=False``: the frozen backbone with no part at all (what a peft adapter is loaded onto)."""
    vit = copy.deepcopy(model.backbone)
    if merged:
        vit = fold(vit)
    else:
        vit = strip(vit)
        for blk in vit.blocks:  # modules parts placed beside the blocks (AdaptFormer's adapters)
            if hasattr(blk, "adaptmlp"):
                del blk.adaptmlp
    _set_pooling(vit, model.pooling, model.num_prompts if merged else 0)
    vit.head = copy.deepcopy(model.head)
    vit.num_classes = model.num_classes
    vit.requires_grad_(False)
    return vit.eval()


def merge(model) -> nn.Module:
    """``model`` (LoRA, SSF, BitFit, full, linear, or a composition of them) as one plain timm ViT with its head,
    logits equal to the tuned model's. A part that cannot fold raises NotMergeable naming it."""
    reasons = model.not_mergeable()
    if reasons:
        raise NotMergeable(f"method '{model.method}' cannot be merged: {'; '.join(reasons)}")
    return timm_classifier(model, merged=True)


def merged_identity(model) -> Dict:
    """What rebuilds the merged timm model: gapt's backbone name, image size, pooling and classes."""
    return {"backbone": model.backbone_name, "method": model.method, "pooling": model.pooling,
            "image_size": model.image_size, "num_classes": model.num_classes, "class_names": model.class_names}


def save_merged(model, path: str) -> nn.Module:
    """Merge ``model`` and write the timm ViT's state dict (head included) as safetensors; returns the merged ViT.

    ``load_merged(path)`` rebuilds it; without gapt, build the same timm ViT (the metadata's ``config``
    names backbone, pooling and classes) and ``load_state_dict`` the file."""
    from .. import __version__
    from .tuned import write_safetensors
    vit = merge(model)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in vit.state_dict().items()}
    write_safetensors(tensors, path, {"format": FORMAT, "gapt_version": __version__,
                                      "config": json.dumps(merged_identity(model))})
    return vit


def load_merged(path: str, device: Optional[str] = None) -> nn.Module:
    """The timm ViT (with its head, in eval mode) that :func:`save_merged` wrote to ``path``."""
    from safetensors.torch import load_file
    from .backbones import create_vit, resolve_spec
    from .checkpoints import CheckpointError
    from .tuned import read_safetensors_metadata
    meta = read_safetensors_metadata(path, "merged model file")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a gapt merged model (metadata format={meta.get('format')!r})")
    ident = json.loads(meta["config"])
    vit = create_vit(resolve_spec(ident["backbone"]), ident["image_size"])
    _set_pooling(vit, ident["pooling"])
    vit.head = nn.Linear(vit.embed_dim, ident["num_classes"])
    vit.num_classes = ident["num_classes"]
    state = load_file(str(path), device=device or "cpu")
    missing, unexpected = vit.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit backbone {ident['backbone']}: missing {missing}, "
                              f"unexpected {unexpected}")
    vit.class_names = ident.get("class_names")
    vit.requires_grad_(False)
    return vit.eval()
