"""Selection ratio of Gated Prompt Tuning (SPEC §2, paper Fig. 4).

Unrolling Z_P^l = g_l Z~_P^l + (1 - g_l) Z_P^{l-1} over l = 1..L-1, the prompt entering the
last block is prod_k (1 - g_k) P + sum_l g~_l Z~_P^l with g~_l = g_l prod_{k>l} (1 - g_k).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch


def selection_ratio_from_gates(gates: torch.Tensor) -> Dict[str, object]:
    g = gates.detach().double().cpu()
    keep = 1 - g
    # suffix products prod_{k>l}(1 - g_k): shift the reversed cumulative product by one
    suffix = torch.cat([torch.flip(torch.cumprod(torch.flip(keep, [0]), 0), [0])[1:], torch.ones(1, dtype=g.dtype)])
    weights = g * suffix
    return {
        "gate": g.tolist(),
        "block_weight": weights.tolist(),                       # g~_l
        # r_l; all gates closed (possible with hard gates) leaves no block any weight
        "selection_ratio": (weights / weights.sum() if weights.sum() > 0 else torch.zeros_like(weights)).tolist(),
        "inserted_prompt_weight": float(torch.prod(keep)),      # weight left on P
    }


def selection_ratio(model) -> Dict[str, object]:
    """Per block l = 1..L-1: gate g_l, weight g~_l, ratio r_l; plus the inserted prompt's weight.

    Also returns the (clamped) temperatures when the model learns them.
    """
    if getattr(model, "gate_logits", None) is None:
        raise ValueError(f"selection_ratio needs a gated model, got method '{getattr(model, 'method', '?')}'")
    hard = getattr(model, "gate_type", "soft") == "hard"  # the gates evaluation uses: 1[gamma > 0]
    gates = (model.gate_logits > 0).to(model.gate_logits.dtype) if hard else model.gate_logits.sigmoid()
    out = selection_ratio_from_gates(gates)
    temperature: Optional[List[float]] = None
    if model.temperature is not None:
        temperature = model.temperature.detach().clamp(0.01, 10.0).cpu().tolist()
    out["temperature"] = temperature
    return out
