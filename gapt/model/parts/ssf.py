"""SSF: scale and shift the features (SPEC §12.6; dongzelian/SSF ``models/vision_transformer.py``:
``init_ssf_scale_shift``, ``ssf_ada``).

    y = gamma * f(x) + beta   over the channel dimension,  gamma ~ N(1, 0.02), beta ~ N(0, 0.02)

after 8 places of a timm ViT, as the official code: the patch projection (per output channel),
``norm1``, ``attn.qkv`` (3D channels), ``attn.proj``, ``norm2``, ``mlp.fc1`` (before the GELU),
``mlp.fc2``, and the final ``norm``. Each place is a :class:`ScaleShift` wrapper
(``<module>.ssf_scale`` / ``.ssf_shift``). No weight decay on gamma and beta (SSF's optimizer
factory: 1-D tensors). Folds exactly: after a Linear or conv W' = diag(gamma) W, b' = gamma b + beta;
after a LayerNorm weight' = gamma weight, bias' = gamma bias + beta.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import Part, Wrapper, check_timm_vit, wrap


class ScaleShift(Wrapper):
    """gamma * base(x) + beta on the channel dimension (the last one, or dimension 1 for a conv's maps)."""

    def __init__(self, base_layer: nn.Module, channels: int, channel_dim: int = -1):
        super().__init__(base_layer)
        self.channel_dim = channel_dim
        self.ssf_scale = nn.Parameter(torch.empty(channels).normal_(mean=1.0, std=0.02))
        self.ssf_shift = nn.Parameter(torch.empty(channels).normal_(std=0.02))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.channel_dim == 1:
            return y * self.ssf_scale.view(1, -1, 1, 1) + self.ssf_shift.view(1, -1, 1, 1)
        return y * self.ssf_scale + self.ssf_shift

    @torch.no_grad()
    def folded(self) -> nn.Module:
        inner = self.base_layer.folded() if isinstance(self.base_layer, Wrapper) else self.base_layer
        w = inner.weight
        if w is None:
            raise ValueError(f"ssf cannot fold into a {type(inner).__name__} without an affine weight")
        scale, shift = self.ssf_scale.to(w.dtype), self.ssf_shift.to(w.dtype)
        w.mul_(scale.view(-1, *([1] * (w.ndim - 1))))  # row / output channel c scaled by gamma_c
        if inner.bias is None:
            inner.bias = nn.Parameter(shift.clone(), requires_grad=False)
        else:
            inner.bias.mul_(scale).add_(shift)
        return inner


# SSF's places inside each block (module paths under the block); plus the patch projection and the final norm
BLOCK_PLACES = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


def _channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    raise ValueError(f"ssf: no scale-shift rule for a {type(module).__name__}")


class SSF(Part):
    name = kind = "ssf"

    def attach(self, model) -> None:
        vit = model.backbone
        check_timm_vit(vit, "ssf")
        places = [(vit.patch_embed, "proj", 1)]
        for blk in vit.blocks:
            for path in BLOCK_PLACES:
                *parents, leaf = path.split(".")
                parent = blk
                for p in parents:
                    parent = getattr(parent, p)
                places.append((parent, leaf, -1))
        places.append((vit, "norm", -1))
        for parent, leaf, dim in places:
            module = getattr(parent, leaf)
            if isinstance(module, Wrapper) and not hasattr(module, "lora_A"):
                raise ValueError(f"ssf: {type(parent).__name__}.{leaf} already carries a part")
            base = module.base() if isinstance(module, Wrapper) else module
            wrap(parent, leaf, lambda m: ScaleShift(m, _channels(base), dim))

    def owns(self, name: str) -> bool:
        return name.endswith((".ssf_scale", ".ssf_shift"))

    def no_decay(self, name: str, p: torch.Tensor) -> bool:
        return True  # gamma and beta are 1-D: SSF's timm optimizer keeps them out of weight decay

    def not_mergeable(self) -> str:
        return ""
