"""One timm block's forward with the parts' hook points inside it (temperature, extra keys/values, a
branch beside the MLP). Without any of them timm's own (fused) block forward runs.

The backbone's own modules and weights are reused, never copied. RoPE (Eva, e.g. DINOv3): the
rotary embedding applies to the patch tokens only; CLS, registers and prompts are prefix tokens
without position, wherever the prompts enter.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .parts.base import BlockCall


def _qkv(attn: nn.Module, x: torch.Tensor):
    """q, k, v (B, heads, N, head_dim) of a timm ViT Attention or EvaAttention (fused or separate)."""
    B, N, _ = x.shape
    if getattr(attn, "qkv", None) is None:  # Eva with separate projections
        return [p(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    if getattr(attn, "q_bias", None) is not None:  # Eva: q and v biases, the k bias fixed at zero
        qkv = F.linear(x, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
    else:
        qkv = attn.qkv(x)
    return qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def attention(attn: nn.Module, x: torch.Tensor, temperature: Optional[torch.Tensor] = None,
              return_probs: bool = False, rope: Optional[torch.Tensor] = None, extra_kv=None,
              attn_mask: Optional[torch.Tensor] = None):
    """timm Attention with a softmax temperature: scaling Q by 1/tau keeps the fused kernel.

    ``rope`` (Eva): the rotary embedding of the patch grid, applied to the last ``len(rope)``
    tokens (the patches) only, never to the prefix tokens (CLS, registers, prompts).
    ``extra_kv(k, v) -> (k', v')``: a part's extra keys and values (attended to, never output rows).
    ``attn_mask`` (N, N) bool: True where a query row may attend to a key column (DA-VPT's prompt mask).
    """
    B, N, _ = x.shape
    q, k, v = _qkv(attn, x)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        from timm.layers import apply_rot_embed_cat
        n, half = rope.shape[-2], getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :N - n], apply_rot_embed_cat(q[:, :, N - n:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :N - n], apply_rot_embed_cat(k[:, :, N - n:], rope, half=half)], dim=2).type_as(v)
    if extra_kv is not None:
        k, v = extra_kv(k, v)
    if temperature is not None:
        q = q / temperature.to(q.dtype)
    probs = None
    if return_probs:  # explicit softmax, for attention maps
        scores = q * attn.scale @ k.transpose(-2, -1)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        out = probs @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    out = out.transpose(1, 2).reshape(B, N, -1)
    out = attn.norm(out) if hasattr(attn, "norm") else out
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    out = attn.proj_drop(attn.proj(out))
    return (out, probs) if return_probs else out


def layer_scale(blk: nn.Module, i: int, y: torch.Tensor) -> torch.Tensor:
    """LayerScale of branch ``i``: ViT's ``ls1``/``ls2`` modules or Eva's ``gamma_1``/``gamma_2`` (or none)."""
    ls = getattr(blk, f"ls{i}", None)
    if ls is not None:
        return ls(y)
    gamma = getattr(blk, f"gamma_{i}", None)
    return y if gamma is None else gamma * y


def block_forward(blk: nn.Module, x: torch.Tensor, call: Optional[BlockCall] = None) -> torch.Tensor:
    """``blk`` on tokens ``x`` with what the parts set in ``call`` (None: the plain block)."""
    call = call or BlockCall()
    rope = call.rope
    if call.runs_timm_block():
        if rope is None:
            return blk(x)  # timm's own (fused) path; wrapped layers (LoRA, SSF) run inside it
        if x.shape[1] - rope.shape[-2] == blk.attn.num_prefix_tokens:
            return blk(x, rope=rope)  # Eva without prompts: timm's own path
    out = attention(blk.attn, blk.norm1(x), call.temperature, return_probs=call.probs is not None, rope=rope,
                    extra_kv=call.extra_kv, attn_mask=call.attn_mask)
    if call.probs is not None:
        out, probs = out
        call.probs.append(probs.detach())
    x = x + blk.drop_path1(layer_scale(blk, 1, out))
    branch = blk.drop_path2(layer_scale(blk, 2, blk.mlp(blk.norm2(x))))
    if call.mlp_parallel is not None:  # AdaptFormer: beside the MLP, fed the tokens after attention
        branch = branch + call.mlp_parallel(x)
    return x + branch


def check_backbone_blocks(vit: nn.Module) -> None:
    """Eva backbones: the pre-norm EvaBlock with EvaAttention and one RoPE for every block is what
    the prompted forward implements; other variants are named in an error, not run wrongly."""
    if type(vit).__name__ != "Eva":
        return
    if getattr(vit, "rope_mixed", False):
        raise ValueError("Eva backbones with per-block (mixed) RoPE are not supported for prompting")
    for blk in vit.blocks:
        if type(blk).__name__ != "EvaBlock" or type(blk.attn).__name__ != "EvaAttention":
            raise ValueError(f"Eva backbone with {type(blk).__name__}/{type(blk.attn).__name__} blocks is not "
                             "supported for prompting (EvaBlock with EvaAttention is)")
