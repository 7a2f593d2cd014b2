"""Prompt tokens (VPT, SPEC §1 and §12.0): shallow, deep, or inserted at block k.

Sequence [CLS (+ registers), p_1..p_Np, z_1..z_N]; prompts carry no position embedding.
  vpt-shallow   prompts enter at block 1 and flow through every block
  vpt-at-block  blocks 1..k-1 run prompt-free; prompts enter at block k and flow on
  vpt-deep      block l > 1 gets fresh prompts that replace the previous block's prompt outputs
Init: U(-v, v), v = sqrt(6 / (3 ph pw + D)) (VPT's Xavier-uniform). Dropout on the inserted
prompts in training only, a mask per sample. Names as VPT's: ``prompt_embeddings``,
``deep_prompt_embeddings`` (blocks 2..L).
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from ...method import DEEP_PROMPT_METHODS
from .base import Part, Step


def prompt_init_bound(patch_size: Sequence[int], embed_dim: int) -> float:
    """VPT's Xavier-uniform bound for prompts: sqrt(6 / (3 * ph * pw + D))."""
    return math.sqrt(6.0 / float(3 * patch_size[0] * patch_size[1] + embed_dim))


class PromptTokens(Part):
    kind = "prompts"
    hooks = ("tokens",)

    def __init__(self, settings, component: str):
        super().__init__(settings)
        self.name = component            # vpt-shallow | vpt-deep | vpt-at-block | gated | vfpt | e2vpt
        self.deep = component in DEEP_PROMPT_METHODS  # fresh prompts before every block (vpt-deep, vfpt, e2vpt)
        self.insert_at = settings.insert_at_block if component == "vpt-at-block" else 1
        self.num_prompts = int(settings.num_prompts)
        if self.num_prompts < 1:
            raise ValueError(f"method '{component}' needs num_prompts >= 1, got {self.num_prompts}")

    def attach(self, model) -> None:
        depth, dim = model.depth, model.embed_dim
        if not 1 <= self.insert_at <= depth:
            raise ValueError(f"insert_at_block={self.insert_at} is outside the backbone's blocks 1..{depth}")
        bound = prompt_init_bound(model.backbone.patch_embed.patch_size, dim)
        model.prompt_embeddings = nn.Parameter(torch.empty(1, self.num_prompts, dim).uniform_(-bound, bound))
        if self.deep:  # blocks 2..L
            model.deep_prompt_embeddings = nn.Parameter(
                torch.empty(depth - 1, self.num_prompts, dim).uniform_(-bound, bound))

    def frozen_blocks(self, model) -> int:
        return self.insert_at - 1

    def owns(self, name: str) -> bool:
        return name in ("prompt_embeddings", "deep_prompt_embeddings")

    def not_mergeable(self) -> str:
        return f"{self.name}: prompts are extra tokens in the sequence, not a change of the weights"

    def insertions(self, model) -> List[Tuple[str, int, int]]:
        """(tensor name, row, 1-based block) of every prompt set: where data-driven inits take their tokens."""
        if self.deep:
            return [("prompt_embeddings", 0, 1)] + [("deep_prompt_embeddings", block - 2, block)
                                                    for block in range(2, model.depth + 1)]
        return [("prompt_embeddings", 0, self.insert_at)]

    def transform(self, model, i: int, p: torch.Tensor) -> torch.Tensor:
        """The inserted prompts (B, M, D) after dropout, before they enter block ``i``: VFPT's FFT and E2VPT's
        masks (subclasses in fourier.py / kv_prompts.py); VPT inserts them as they are."""
        return p

    def tokens(self, model, i: int, x: torch.Tensor, step: Step) -> torch.Tensor:
        if i == self.insert_at - 1:
            p, rest = model.prompt_embeddings, x[:, step.prefix:]
        elif self.deep and i > 0:
            p, rest = model.deep_prompt_embeddings[i - 1][None], x[:, step.prefix + self.num_prompts:]
        else:
            return x
        p = model.prompt_dropout(p.expand(x.shape[0], -1, -1))  # a dropout mask per sample
        p = self.transform(model, i, p)
        return torch.cat([x[:, :step.prefix], p, rest], dim=1)
