"""Adaptive Attention Shaping (SPEC §3): one learnable softmax temperature per block, shared by the heads.

Block l attends with softmax(Q K^T d^-1/2 / tau_l) over the whole sequence; tau starts at 1 and is
clamped to [0.01, 10] in place before every forward pass (a projection outside the autograd graph,
not a clamp inside it). Applied by scaling Q by 1 / tau, which keeps the fused attention kernel.
Name as the reference's ``temp``: ``temperature``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import BlockCall, Part, Step

TEMPERATURE_RANGE = (0.01, 10.0)


class Temperature(Part):
    name = kind = "temperature"
    hooks = ("begin", "block")

    def attach(self, model) -> None:
        model.temperature = nn.Parameter(torch.ones(model.depth))

    def owns(self, name: str) -> bool:
        return name == "temperature"

    def not_mergeable(self) -> str:
        return "learn_temperature: temperatures come with prompts, which are not part of the weights"

    def begin(self, model, step: Step) -> None:
        clamp_temperature_(model)

    def block(self, model, i: int, call: BlockCall, step: Step) -> None:
        call.temperature = model.temperature[i]


@torch.no_grad()
def clamp_temperature_(model) -> None:
    """Projection of tau onto [0.01, 10], outside the autograd graph (SPEC §3)."""
    if model.temperature is not None:
        model.temperature.clamp_(*TEMPERATURE_RANGE)
