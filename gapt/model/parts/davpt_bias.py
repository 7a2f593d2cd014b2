"""The "+" of DA-VPT+ (SPEC §12.5(c)): a chosen subset of the frozen backbone's biases (and, as some
released configs, norm1, cls_token), trained. ``method=da-vpt+davpt-bias`` (also spelt ``da-vpt+``) is DA-VPT+.

Noahsark/DA-VPT ``model_creator.py::create_model`` switches on ``bias_v``, ``bias_proj``, ``bias_fc2`` and
``bias_norm2`` in every released config, i.e. ``learnable_list`` gets ``v.bias``, ``proj.bias``,
``fc2.bias`` and ``norm2.bias``; ``PromptVisionTransformer.set_learnable_parameters`` matches those
against the last two parts of each parameter name, so ``proj.bias`` also trains the patch embedding's
``patch_embed.proj.bias``, and so here. ``davpt_bias_tensors`` lists what is trained (default the four
above); the configs' other switches are names there too: ``k.bias`` (``bias_k``), ``q.bias``, ``fc1.bias``,
``norm1.bias``, ``norm1`` (``norm_norm1``: weight and bias), ``norm2``, ``cls_token`` (``train_cls``).

The authors split timm's fused ``qkv`` into ``q``, ``k``, ``v`` Linears; gapt keeps the fused layer and
wraps it (:class:`QKVBias`) with trained ``q_bias`` / ``k_bias`` / ``v_bias`` that replace those thirds of
the frozen bias: the same function, and it folds back into ``qkv.bias`` (``gapt.merge``). Everything
else is the backbone's own tensor, trained in place. No weight decay on biases and 1-D tensors (the
authors' ``param_groups_weight_decay``); ``cls_token`` decays like the prompts.

Checkpoints: :func:`authors_name` gives a gapt tensor's name in the authors' state dict
(``backbone.blocks.3.attn.qkv.v_bias`` -> ``blocks.3.attn.v.bias``, prompts and head unchanged), and
:func:`load_authors_state` / :func:`authors_state` move a DA-VPT(+) model's trained tensors both ways.
"""
from __future__ import annotations

import re
from typing import Dict, List

import torch
import torch.nn as nn

from .base import Part, Wrapper, wrap

DEFAULT_TENSORS = ("v.bias", "proj.bias", "fc2.bias", "norm2.bias")
ALLOWED_TENSORS = DEFAULT_TENSORS + ("q.bias", "k.bias", "fc1.bias", "norm1.bias", "norm1", "norm2", "cls_token")


def parse_tensors(text: str) -> List[str]:
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    bad = [t for t in names if t not in ALLOWED_TENSORS]
    if bad or not names:
        raise ValueError(f"davpt_bias_tensors: unknown {bad or '(none given)'}; choose from {list(ALLOWED_TENSORS)}")
    return names


def _inner(module: nn.Module) -> nn.Module:
    return module.base() if isinstance(module, Wrapper) else module


class QKVBias(Wrapper):
    """timm's fused qkv Linear with trained q / k / v biases in place of the frozen thirds.

    The frozen bias is read when the layer runs (not copied at attach time), so the backbone's weights may be
    loaded after the part attached; the trained tensors start as a copy of it."""

    def __init__(self, base_layer: nn.Module, which: List[str]):
        super().__init__(base_layer)
        bias = _inner(base_layer).bias
        if bias is None:
            raise ValueError("davpt-bias: the backbone's attn.qkv has no bias to train")
        d = bias.shape[0] // 3
        self.which = [w for w in ("q", "k", "v") if w in which]
        for w in self.which:
            j = "qkv".index(w)
            setattr(self, f"{w}_bias", nn.Parameter(bias.detach()[j * d:(j + 1) * d].clone()))

    def delta(self) -> torch.Tensor:
        """The trained biases minus the frozen ones (zero for the thirds not trained)."""
        frozen = _inner(self.base_layer).bias
        d = frozen.shape[0] // 3
        pieces = []
        for j, w in enumerate("qkv"):
            part = frozen[j * d:(j + 1) * d]
            pieces.append(getattr(self, f"{w}_bias") - part if w in self.which else torch.zeros_like(part))
        return torch.cat(pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.delta().to(x.dtype)

    @torch.no_grad()
    def folded(self) -> nn.Module:
        delta = self.delta()
        inner = self.base_layer.folded() if isinstance(self.base_layer, Wrapper) else self.base_layer
        inner.bias.add_(delta.to(inner.bias.dtype))
        return inner


class DAVPTBias(Part):
    name = kind = "davpt-bias"

    def __init__(self, settings):
        super().__init__(settings)
        self.tensors = parse_tensors(settings.davpt_bias_tensors)
        self.names: set = set()

    def attach(self, model) -> None:
        vit, want = model.backbone, set(self.tensors)
        trained: List[nn.Parameter] = []

        def train(p) -> None:
            if p is None:
                raise ValueError("davpt-bias: the backbone lacks a tensor it should train")
            p.requires_grad_(True)
            trained.append(p)
        qkv_which = [w for w in ("q", "k", "v") if f"{w}.bias" in want]
        for blk in vit.blocks:
            if qkv_which:
                trained += list(wrap(blk.attn, "qkv", lambda m: QKVBias(m, qkv_which)).parameters(recurse=False))
            if "proj.bias" in want:
                train(_inner(blk.attn.proj).bias)
            for fc in ("fc1", "fc2"):
                if f"{fc}.bias" in want:
                    train(_inner(getattr(blk.mlp, fc)).bias)
            for norm in ("norm1", "norm2"):
                ln = _inner(getattr(blk, norm))
                if norm in want:
                    train(ln.weight)
                if norm in want or f"{norm}.bias" in want:
                    train(ln.bias)
        if "proj.bias" in want:  # set_learnable_parameters matches "proj.bias" here too
            train(_inner(vit.patch_embed.proj).bias)
        if "cls_token" in want:
            train(vit.cls_token)
        ids = {id(p) for p in trained}
        self.names = {n for n, p in model.named_parameters() if id(p) in ids}

    def owns(self, name: str) -> bool:
        return name in self.names

    def no_decay(self, name: str, p: torch.Tensor) -> bool:
        return p.ndim <= 1

    def not_mergeable(self) -> str:
        return ""


# -- the authors' checkpoint names -------------------------------------------------------------------
def authors_name(name: str) -> str:
    """A gapt tensor name as in the authors' ``PromptVisionTransformer.state_dict()``."""
    name = re.sub(r"^backbone\.", "", name).replace(".base_layer", "")
    return re.sub(r"attn\.qkv\.([qkv])_bias$", r"attn.\1.bias", name)


def authors_state(model) -> Dict[str, torch.Tensor]:
    """The model's trained tensors under the authors' names."""
    return {authors_name(n): p.detach().clone() for n, p in model.tuned_parameters().items()}


@torch.no_grad()
def load_authors_state(model, state: Dict[str, torch.Tensor]) -> None:
    """Copy a DA-VPT(+) checkpoint's tensors (the authors' names; a whole ``state_dict()`` of their model, or
    only its trained part) into ``model``'s trained tensors. A trained tensor missing from ``state`` or of
    another shape is an error that names it."""
    for name, p in model.tuned_parameters().items():
        key = authors_name(name)
        if key not in state:
            raise KeyError(f"the checkpoint has no {key!r} (gapt's {name})")
        value = torch.as_tensor(state[key])
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"{key}: shape {tuple(value.shape)} in the checkpoint, {tuple(p.shape)} in the model")
        p.copy_(value.to(p.dtype))
