"""AdaptFormer's parallel MLP adapter (SPEC §12.6; ShoufaChen/AdaptFormer ``models/adapter.py::Adapter`` with
``ffn_option=parallel``, ``ffn_adapter_layernorm_option=none``, ``ffn_adapter_init_option=lora``).

In every block, with x the tokens after the attention residual:

    adapter(x) = scale * (W_up Dropout(ReLU(W_down x + b_down)) + b_up)      (scale 0.1, bottleneck 64)
    block(x)   = x + (DropPath(mlp(norm2(x))) + adapter(x))

W_down Kaiming-uniform(a=sqrt(5)), b_down = W_up = b_up = 0, so every block starts as the frozen one.
The scale multiplies the up-projection's bias too, as the official ``up = up_proj(down); up = up * scale``.
Named as AdaptFormer's ``blocks.i.adaptmlp.{down_proj,up_proj}``. Nonlinear: it cannot fold into the weights.
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import BlockCall, Part, Step


class Adapter(nn.Module):
    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float):
        super().__init__()
        self.down_proj = nn.Linear(dim, bottleneck)
        self.up_proj = nn.Linear(bottleneck, dim)
        self.scale, self.dropout = float(scale), float(dropout)
        with torch.no_grad():  # AdaptFormer's "lora" init
            nn.init.kaiming_uniform_(self.down_proj.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down_proj.bias)
            nn.init.zeros_(self.up_proj.weight)
            nn.init.zeros_(self.up_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = F.dropout(F.relu(self.down_proj(x)), p=self.dropout, training=self.training)
        return self.up_proj(down) * self.scale


class AdaptFormer(Part):
    name = "adaptformer"
    kind = "adapter"
    hooks = ("block",)

    def attach(self, model) -> None:
        s = self.settings
        for blk in model.backbone.blocks:
            blk.adaptmlp = Adapter(model.embed_dim, int(s.adapter_dim), float(s.adapter_scale), float(s.adapter_dropout))

    def block(self, model, i: int, call: BlockCall, step: Step) -> None:
        call.mlp_parallel = model.backbone.blocks[i].adaptmlp

    def owns(self, name: str) -> bool:
        return ".adaptmlp." in name

    def no_decay(self, name: str, p: torch.Tensor) -> bool:
        return p.ndim <= 1  # AdaptFormer's optim_factory.add_weight_decay: no decay on biases

    def train_modules(self, model) -> List[nn.Module]:
        return [blk.adaptmlp for blk in model.backbone.blocks]  # its dropout runs in training

    def not_mergeable(self) -> str:
        return "adaptformer: the adapter is a nonlinear branch (ReLU), it cannot fold into the frozen weights"
