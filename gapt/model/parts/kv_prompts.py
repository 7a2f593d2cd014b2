"""E2VPT (Han et al., ICCV 2023; SPEC §12.4): key-value prompts inside every attention, plus deep visual prompts
with a token mask and a piece mask that pruning later fixes.

As the official code runs it (ChengHan111/E2VPT @ 7a66e75e, ``TRANSFER_TYPE "P_VK"``; SSL backbones:
``src/models/vit_backbones/vit_{mae,moco}_changeVK.py::Attention_VK`` and
``src/models/vit_prompt/vit_{mae,moco}_prompt_VK.py``):

- Key-value prompts: block l owns Theta_l (H, M_kv, dh) (``deep_QKV_embeddings`` of its attention, here
  ``backbone.blocks.<l>.attn.deep_QKV_embeddings``). After the qkv projection, per head, the same tensor is put
  before the keys and before the values (``SHARE_PARAM_KV=True``, ``LAYER_BEHIND=True``; the MAE / MoCo files
  support nothing else): K' = [Theta, K], V' = [Theta, V], out = proj(softmax(Q K'^T dh^-1/2) V'). Theta
  bypasses norm1 and the projections; queries stay the N tokens, so the block's output keeps its length. KV
  dropout (``P_VK.DROPOUT``) is 0 in every released command; gapt has none. Init (``ORIGIN_INIT`` 2, and any
  integer in the MAE / MoCo files, which compare it with the strings '0' / '1'): kaiming_uniform_(a=0,
  fan_in, leaky_relu) on the 3-D tensor, fan_in = M_kv * dh: U(+-sqrt(6 / (M_kv dh))).
- Visual prompts: VPT-deep (``prompt_embeddings`` (1, M_p, D), ``deep_prompt_embeddings`` (L-1, M_p, D), U(+-v),
  ``DROPOUT_P`` 0.1). Before every block the inserted prompts are Dropout(P_l) * R * gamma, one pair of masks for
  all blocks: gamma = ``prompt_soft_tokens_mask_cls_token`` (M_p,) and r =
  ``prompt_soft_tokens_pieces_mask_cls_token`` (M_p, 16), tiled as ``r.repeat(1, D / 16)``, so piece j covers the
  STRIDED dimensions {j, j + 16, j + 32, ...}. Both start at 1 and, named "prompt...", are trained (with weight
  decay) as multiplicative gates before pruning (``e2vpt_masks=learned``); a rewound run zeroes the pruned entries
  and freezes both (``e2vpt_masks=fixed``, the entries from ``e2vpt_masked_tokens`` / ``_pieces``); the "Origin
  5runs" commands train without them (``MASK_CLS_TOKEN=False``: ``e2vpt_masks=none``).

Pruning (``src/engine/trainer.py::determine_mask_sequence, what_tokens_to_mask, what_tokens_pieces_to_mask``,
``tune_vtab_PruningRewind_CVK.py::cal_mt_mtp``) selects masks from importance scores; the functions at the end
of this module do that selection (the pass that computes the scores is gapt/engine/importance.py, the pipeline
gapt/sweep/e2vpt_prune.py).
"""
from __future__ import annotations

from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ...method import E2VPT_PIECES
from .base import BlockCall, Part, Step
from .prompts import PromptTokens

TOKEN_MASK, PIECE_MASK = "prompt_soft_tokens_mask_cls_token", "prompt_soft_tokens_pieces_mask_cls_token"
KV_NAME = "deep_QKV_embeddings"


class MaskedPrompts(PromptTokens):
    """E2VPT's deep visual prompts, multiplied by the token mask gamma and the strided piece mask r."""

    def __init__(self, settings, component: str = "e2vpt"):
        super().__init__(settings, component)
        self.deep = True
        self.masks = settings.e2vpt_masks  # learned | fixed | none

    def attach(self, model) -> None:
        super().attach(model)
        if self.masks == "none":
            return
        if model.embed_dim % E2VPT_PIECES:
            raise ValueError(f"e2vpt splits each prompt into {E2VPT_PIECES} strided pieces: the embedding width "
                             f"{model.embed_dim} must be a multiple of {E2VPT_PIECES} (or use e2vpt_masks=none)")
        learned = self.masks == "learned"
        tokens, pieces = torch.ones(self.num_prompts), torch.ones(self.num_prompts, E2VPT_PIECES)
        if not learned:  # the rewound runs: pruned entries 0, both masks frozen (mask_soft_tokens[_pieces])
            tokens[list(self.settings.e2vpt_masked_tokens)] = 0.0
            for j, row in enumerate(self.settings.e2vpt_masked_pieces):
                pieces[j, list(row)] = 0.0
        setattr(model, TOKEN_MASK, nn.Parameter(tokens, requires_grad=learned))
        setattr(model, PIECE_MASK, nn.Parameter(pieces, requires_grad=learned))

    def owns(self, name: str) -> bool:
        return super().owns(name) or name in (TOKEN_MASK, PIECE_MASK)

    def not_mergeable(self) -> str:
        return "e2vpt: prompts and key-value prompts are extra tokens, not a change of the weights"

    def transform(self, model, i: int, p: torch.Tensor) -> torch.Tensor:
        if self.masks == "none":
            return p
        tokens, pieces = getattr(model, TOKEN_MASK), getattr(model, PIECE_MASK)
        # (P * R) * gamma, in the official order; R[t, d] = r[t, d % 16]
        return p * pieces.repeat(1, p.shape[-1] // E2VPT_PIECES) * tokens.view(-1, 1)


def prepend_kv(theta: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention_VK (LAYER_BEHIND, shared): the block's prompts Theta (H, M_kv, dh) before its keys and its values."""
    t = theta.to(k.dtype).expand(k.shape[0], -1, -1, -1)
    return torch.cat([t, k], dim=2), torch.cat([t, v], dim=2)


class KVPrompts(Part):
    """One (H, M_kv, dh) tensor per block, shared by keys and values (E2VPT's deep_QKV_embeddings)."""
    name, kind = "e2vpt", "kv_prompts"
    hooks = ("block",)

    def __init__(self, settings):
        super().__init__(settings)
        self.num_kv = int(settings.kv_prompts)
        if self.num_kv < 1:
            raise ValueError(f"method 'e2vpt' needs kv_prompts >= 1, got {self.num_kv}")

    def attach(self, model) -> None:
        for blk in model.backbone.blocks:
            attn = blk.attn
            head_dim = getattr(attn, "head_dim", None) or model.embed_dim // attn.num_heads
            theta = torch.empty(attn.num_heads, self.num_kv, head_dim)
            nn.init.kaiming_uniform_(theta, a=0, mode="fan_in", nonlinearity="leaky_relu")
            attn.register_parameter(KV_NAME, nn.Parameter(theta))

    def owns(self, name: str) -> bool:
        return name.endswith(f".attn.{KV_NAME}")

    def not_mergeable(self) -> str:
        return "e2vpt: key-value prompts are extra keys and values in every attention, not a change of the weights"

    def block(self, model, i: int, call: BlockCall, step: Step) -> None:
        call.extra_kv = partial(prepend_kv, getattr(model.backbone.blocks[i].attn, KV_NAME))


# -- pruning: which tokens and pieces to mask, from importance scores (SPEC §12.4(d)) ----------------
PRUNE_PERCENTS = tuple(range(10, 100, 10))  # CLS_TOKEN_MASK_PERCENT = CLS_TOKEN_PIECE_MASK_PERCENT = 10..90
MIN_TOKENS, MIN_PIECES = 1, 4               # MIN_NUMBER_CLS_TOKEN, MIN_NUMBER_CLS_TOKEN_PIECE


def mask_counts(total: int, keep: int, percents: Optional[Sequence[int]] = None) -> List[int]:
    """How many of ``total`` to mask, one mask file per count (determine_mask_sequence, then cal_mt_mtp's
    cumulative file names): n = int(total * p / 100) for each percentage, the first n above ``total - keep``
    replaced by that cap and the last; distinct counts, ascending. Tokens (keep 1): M_p = 10 -> 1..9, 5 -> 0..4,
    1 -> 0; pieces (16, keep 4) -> 1, 3, 4, 6, 8, 9, 11, 12."""
    counts: List[int] = []
    for p in PRUNE_PERCENTS if percents is None else percents:
        n = int(total * p / 100)
        if keep > 0 and n > total - keep:
            counts.append(total - keep)
            break
        counts.append(n)
    return sorted(set(counts))


def mask_order(scores: Sequence[float], reverse: bool = False) -> List[int]:
    """Indices by ascending score (``MASK_RESERVE=False``; ties keep index order, as Python's stable sort of the
    official (index, score) pairs): what_tokens_to_mask masks a prefix of this order, count by count."""
    return sorted(range(len(scores)), key=lambda j: scores[j], reverse=reverse)


def prune_masks(token_scores: Sequence[float], piece_scores: Sequence[Sequence[float]], reverse: bool = False
                ) -> Dict[str, Dict[int, list]]:
    """Every candidate mask, as cal_mt_mtp writes them: ``tokens[n]``, the n masked tokens (sorted), for each
    token count; ``pieces[m]``, per token its m masked pieces (sorted), for each piece count. The piece masks
    are chosen per token and independently of the token masks (not cascaded)."""
    m_p = len(token_scores)
    order = mask_order(token_scores, reverse)
    tokens = {n: sorted(order[:n]) for n in mask_counts(m_p, MIN_TOKENS)}
    orders = [mask_order(row, reverse) for row in piece_scores]
    pieces = {m: [sorted(o[:m]) for o in orders] for m in mask_counts(len(piece_scores[0]), MIN_PIECES)}
    return {"tokens": tokens, "pieces": pieces}


def mask_gradients(model) -> Tuple[torch.Tensor, torch.Tensor]:
    """d loss / d gamma (M_p,) and d loss / d r (M_p, 16) after a backward pass: what the importance sums."""
    tokens, pieces = getattr(model, TOKEN_MASK, None), getattr(model, PIECE_MASK, None)
    if tokens is None or not tokens.requires_grad:
        raise ValueError("the importance of E2VPT's masks needs method=e2vpt with e2vpt_masks=learned")
    zero = torch.zeros_like
    return (tokens.grad if tokens.grad is not None else zero(tokens),
            pieces.grad if pieces.grad is not None else zero(pieces))
