"""A straightforward implementation of SPEC §2-3 (gated prompts + per-block temperature): the baseline.

Written the way one would write the method from the paper without caring about speed:

* explicit softmax attention: ``softmax(Q K^T * d^-0.5 / tau_l) V``, the temperature dividing
  the attention logits (an (B, heads, S, S) tensor), no fused kernel;
* prompts spliced into the token sequence with ``torch.cat`` (inserted before block 1, and the
  gated prompt slice re-spliced after every block but the last);
* its own ``nn.Linear`` / ``nn.LayerNorm`` / ``nn.Conv2d`` modules holding copies of the frozen
  weights of a gapt model's timm backbone, so both compute the same function
  (:func:`check_equal` verifies the logits before anything is timed).

It mirrors gapt's ``PromptedViT`` for the plain timm ViT blocks the registered backbones use
(no layer scale, no q/k norm, no registers); :meth:`NaiveGatedViT.from_gapt` refuses others.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

TEMPERATURE_RANGE = (0.01, 10.0)


class NaiveBlock(nn.Module):
    """Pre-norm ViT block with explicit softmax attention and a temperature on the logits."""

    def __init__(self, dim: int, num_heads: int, hidden: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def attention(self, x: torch.Tensor, tau: Optional[torch.Tensor]) -> torch.Tensor:
        B, S, D = x.shape
        qkv = self.qkv(x).reshape(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = (q @ k.transpose(-2, -1)) * self.scale
        if tau is not None:
            logits = logits / tau
        probs = logits.softmax(dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(B, S, D)
        return self.proj(out)

    def forward(self, x: torch.Tensor, tau: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), tau)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class NaiveGatedViT(nn.Module):
    """Gated prompt tuning (+ optional temperatures) on a frozen ViT, written out by hand."""

    def __init__(self, *, image_size: int, patch_size: int, dim: int, depth: int, num_heads: int,
                 hidden: int, num_prompts: int, num_classes: int, gate_init: float = 5.0,
                 learn_temperature: bool = True, prompt_dropout: float = 0.1, pooling: str = "mean",
                 eps: float = 1e-6):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be mean or cls, got {pooling!r}")
        n_patches = (image_size // patch_size) ** 2
        self.depth, self.num_prompts, self.pooling = depth, num_prompts, pooling
        self.patch_embed = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n_patches, dim))
        self.blocks = nn.ModuleList(NaiveBlock(dim, num_heads, hidden, eps) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)
        for p in self.parameters():  # the backbone is frozen
            p.requires_grad_(False)
        bound = (6.0 / (3 * patch_size * patch_size + dim)) ** 0.5
        self.prompts = nn.Parameter(torch.empty(1, num_prompts, dim).uniform_(-bound, bound))
        self.gate_logits = nn.Parameter(torch.full((depth - 1,), -float(gate_init)))
        self.temperature = nn.Parameter(torch.ones(depth)) if learn_temperature else None
        self.prompt_dropout = nn.Dropout(prompt_dropout)
        self.head = nn.Linear(dim, num_classes)

    @classmethod
    @torch.no_grad()
    def from_gapt(cls, model) -> "NaiveGatedViT":
        """Same architecture, frozen weights and tuned tensors as a gapt ``PromptedViT`` (method gated)."""
        vit = model.backbone
        if model.method != "gated":
            raise ValueError(f"the naive reference implements method 'gated', not {model.method!r}")
        if model.pooling not in ("mean", "cls"):
            raise ValueError(f"the naive reference pools by mean or cls, not {model.pooling!r}")
        blk0 = vit.blocks[0]
        plain = (vit.num_prefix_tokens == 1 and not getattr(vit, "no_embed_class", False)
                 and isinstance(blk0.ls1, nn.Identity) and isinstance(blk0.attn.q_norm, nn.Identity)
                 and isinstance(vit.norm_pre, nn.Identity))
        if not plain:
            raise ValueError("the naive reference covers plain ViT blocks only (CLS, no registers/layer scale)")
        dim = vit.embed_dim
        naive = cls(image_size=model.image_size, patch_size=model.patch_size, dim=dim, depth=model.depth,
                    num_heads=blk0.attn.num_heads, hidden=blk0.mlp.fc1.out_features,
                    num_prompts=model.num_prompts, num_classes=model.num_classes,
                    learn_temperature=model.temperature is not None, prompt_dropout=model.prompt_dropout.p,
                    pooling=model.pooling, eps=vit.norm.eps)
        naive.patch_embed.weight.copy_(vit.patch_embed.proj.weight)
        naive.patch_embed.bias.copy_(vit.patch_embed.proj.bias)
        naive.cls_token.copy_(vit.cls_token)
        naive.pos_embed.copy_(vit.pos_embed)
        for mine, theirs in zip(naive.blocks, vit.blocks):
            for name, src in [("norm1", theirs.norm1), ("qkv", theirs.attn.qkv), ("proj", theirs.attn.proj),
                              ("norm2", theirs.norm2), ("fc1", theirs.mlp.fc1), ("fc2", theirs.mlp.fc2)]:
                dst = getattr(mine, name)
                dst.weight.copy_(src.weight)
                dst.bias.copy_(src.bias)
        naive.norm.weight.copy_(vit.norm.weight)
        naive.norm.bias.copy_(vit.norm.bias)
        naive.prompts.copy_(model.prompt_embeddings)
        naive.gate_logits.copy_(model.gate_logits)
        if model.temperature is not None:
            naive.temperature.copy_(model.temperature)
        naive.head.load_state_dict(copy.deepcopy(model.head.state_dict()))
        return naive.to(next(model.parameters()).device).train(model.training)

    def tuned_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.temperature is not None:
            with torch.no_grad():  # SPEC §3: a projection outside the autograd graph
                self.temperature.clamp_(*TEMPERATURE_RANGE)
        B, n_p = images.shape[0], self.num_prompts
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed
        prompts = self.prompt_dropout(self.prompts.expand(B, -1, -1))
        x = torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1)  # [CLS, prompts, patches]
        for i, blk in enumerate(self.blocks):
            prompt_in = x[:, 1:1 + n_p]
            tau = self.temperature[i] if self.temperature is not None else None
            x = blk(x, tau)
            if i < self.depth - 1:  # Z_P^l = g_l * block_l(Z)_P + (1 - g_l) * Z_P^{l-1}
                g = torch.sigmoid(self.gate_logits[i])
                x = torch.cat([x[:, :1], g * x[:, 1:1 + n_p] + (1 - g) * prompt_in, x[:, 1 + n_p:]], dim=1)
        if self.pooling == "mean":
            pooled = self.norm(x[:, 1:].mean(dim=1))
        else:
            pooled = self.norm(x)[:, 0]
        return self.head(pooled)


@torch.no_grad()
def check_equal(model, naive: NaiveGatedViT, images: torch.Tensor, atol: float = 1e-4) -> float:
    """Max |logit difference| between gapt and the naive reference (eval mode); raises above ``atol``."""
    was = model.training, naive.training
    model.eval()
    naive.eval()
    try:
        diff = (model(images).float() - naive(images).float()).abs().max().item()
    finally:
        model.train(was[0])
        naive.train(was[1])
    if not diff <= atol:
        raise AssertionError(f"naive reference differs from gapt: max |logit diff| {diff:.3g} > {atol:g}")
    return diff
