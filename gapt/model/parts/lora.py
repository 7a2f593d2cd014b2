"""LoRA on the attention projections (SPEC §12.6), as HF peft's LoRA layer on timm's ViT.

    qkv(x) = W x + b + (alpha / r) * B A x,   A: kaiming_uniform(a=sqrt(5)),  B = 0 at the start

``lora_targets=qkv``: one A, B on timm's fused 3D x D ``attn.qkv`` (what peft does with
``target_modules=["qkv"]``: q, k and v share A). ``lora_targets=q,v``: separate A, B for the q rows and
the v rows (what the literature's tables usually mean; peft cannot slice a fused layer). Defaults
r = 8, alpha = 8 (scale 1), no dropout. Names as peft's: ``blocks.i.attn.qkv.base_layer.*`` (frozen),
``qkv.lora_A.weight`` / ``qkv.lora_B.weight`` (``qkv.lora_A.q.weight`` ... for q,v). Folds exactly:
W' = W + (alpha / r) B A.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from ...method import canonical_lora_targets
from .base import Part, Wrapper, check_timm_vit, wrap


class LoraLinear(Wrapper):
    """A frozen nn.Linear plus (alpha / r) B A on all its outputs, or on given row ranges (``slices``)."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float,
                 slices: Optional[Dict[str, Tuple[int, int]]] = None):
        super().__init__(base_layer)
        d_in, d_out = base_layer.in_features, base_layer.out_features
        self.rank, self.alpha, self.scaling = int(rank), float(alpha), float(alpha) / int(rank)
        self.slices = dict(slices) if slices else None
        if self.slices is None:
            self.lora_A = nn.Linear(d_in, self.rank, bias=False)
            self.lora_B = nn.Linear(self.rank, d_out, bias=False)
            pairs = [(self.lora_A, self.lora_B)]
        else:
            self.lora_A = nn.ModuleDict({k: nn.Linear(d_in, self.rank, bias=False) for k in self.slices})
            self.lora_B = nn.ModuleDict({k: nn.Linear(self.rank, b - a, bias=False) for k, (a, b) in self.slices.items()})
            pairs = [(self.lora_A[k], self.lora_B[k]) for k in self.slices]
        for a, b in pairs:  # peft's init: A Kaiming-uniform, B zero, so the layer starts as the frozen one
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.slices is None:
            return self.lora_B(self.lora_A(x)) * self.scaling
        pieces, pos = [], 0
        for k, (a, b) in sorted(self.slices.items(), key=lambda kv: kv[1]):
            if a > pos:  # rows without an update (k of q,v)
                pieces.append(x.new_zeros(*x.shape[:-1], a - pos))
            pieces.append(self.lora_B[k](self.lora_A[k](x)) * self.scaling)
            pos = b
        if pos < self.base_layer.out_features:
            pieces.append(x.new_zeros(*x.shape[:-1], self.base_layer.out_features - pos))
        return torch.cat(pieces, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.delta(x)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A as a (out, in) matrix."""
        if self.slices is None:
            return self.scaling * self.lora_B.weight @ self.lora_A.weight
        base = self.base_layer
        dw = torch.zeros(base.out_features, base.in_features, dtype=self.lora_A[next(iter(self.slices))].weight.dtype,
                         device=self.lora_A[next(iter(self.slices))].weight.device)
        for k, (a, b) in self.slices.items():
            dw[a:b] = self.scaling * self.lora_B[k].weight @ self.lora_A[k].weight
        return dw

    @torch.no_grad()
    def folded(self) -> nn.Module:
        inner = self.base_layer.folded() if isinstance(self.base_layer, Wrapper) else self.base_layer
        inner.weight.add_(self.delta_weight().to(inner.weight.dtype))
        return inner


class LoRA(Part):
    name = kind = "lora"

    def __init__(self, settings):
        super().__init__(settings)
        self.targets = canonical_lora_targets(settings.lora_targets)
        self.rank, self.alpha = int(settings.lora_rank), float(settings.lora_alpha)

    def attach(self, model) -> None:
        check_timm_vit(model.backbone, "lora")
        for i, blk in enumerate(model.backbone.blocks):
            qkv = blk.attn.qkv
            if not isinstance(qkv, nn.Linear):
                raise ValueError(f"lora: blocks.{i}.attn.qkv is a {type(qkv).__name__}, not a frozen nn.Linear "
                                 f"(a backbone that already carries a part?)")
            third = qkv.out_features // 3
            slices = None if self.targets == "qkv" else {"q": (0, third), "v": (2 * third, 3 * third)}
            wrap(blk.attn, "qkv", lambda m: LoraLinear(m, self.rank, self.alpha, slices))

    def owns(self, name: str) -> bool:
        return ".lora_A." in name or ".lora_B." in name

    def not_mergeable(self) -> str:
        return ""
