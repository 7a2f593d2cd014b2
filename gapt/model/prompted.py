"""A frozen timm ViT + one transfer method, composed of parts (gapt/model/parts) + a linear head.

The forward is one short loop over timm's blocks; each part hooks at a named point (prompt tokens
before a block, temperature / extra keys / a parallel branch inside it, GaPT's gate after it) or
wraps a frozen layer (LoRA, SSF), so a new method adds a part, not a branch here. SPEC §1-3 for
the paper's methods, §12.6 for the PEFT baselines. The backbone's own modules and weights are
reused, never copied; the frozen backbone always runs in eval mode.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..method import (GATE_TYPES, METHODS, POOLINGS, PROMPT_METHODS, MethodSettings, canonical_lora_targets,
                      canonical_method)
from .blocks import attention, block_forward, check_backbone_blocks, layer_scale  # noqa: F401 (re-exported)
from .parts import TEMPERATURE_RANGE, BlockCall, Part, Step, build_parts, prompt_init_bound  # noqa: F401
from .parts.gates import gate_values, hard_gates, mix_prompts  # noqa: F401 (re-exported)
from .parts.temperature import clamp_temperature_

# Attributes parts set on the model (None when the method has no such part): the reference's names.
PART_TENSORS = ("prompt_embeddings", "deep_prompt_embeddings", "gate_logits", "temperature",
                "prompt_soft_tokens_mask_cls_token", "prompt_soft_tokens_pieces_mask_cls_token")  # E2VPT's masks


class PromptedViT(nn.Module):
    """A frozen timm VisionTransformer + one transfer method (a list of parts) + a linear head."""

    def __init__(self, vit: nn.Module, settings: Optional[MethodSettings] = None, *, num_classes: int = 1000,
                 backbone_name: str = "custom", class_names: Optional[List[str]] = None,
                 image_size: Optional[int] = None, **changes):
        """``settings`` (or its fields as keywords: method=..., num_prompts=..., ...) choose the method;
        pooling "" means mean pooling here (``build_model`` resolves it to the backbone's rule)."""
        super().__init__()
        settings = MethodSettings.of(settings, **changes)
        method = canonical_method(settings.method)  # unknown names and impossible compositions: errors
        names = settings.components()
        _check_settings(settings, names, depth=len(vit.blocks))
        check_backbone_blocks(vit)
        has_prompts = any(n in PROMPT_METHODS for n in names)
        pooling = settings.pooling or "mean"

        self.backbone = vit
        # what the tuned file records: prompts counted only where the method has them, pooling resolved
        self.settings = MethodSettings.of(settings, method=method, num_prompts=settings.num_prompts if has_prompts
                                          else 0, pooling=pooling, gate_init=float(settings.gate_init),
                                          lora_targets=canonical_lora_targets(settings.lora_targets))
        self.method = method
        self.backbone_name = backbone_name
        self.depth = len(vit.blocks)
        self.embed_dim = vit.embed_dim
        self.num_prompts = self.settings.num_prompts
        self.gate_init = float(settings.gate_init)
        self.gate_type = settings.gate_type
        self.gate_temperature = float(settings.gate_temperature)
        self.gate_noise: Optional[torch.Generator] = None  # hard gates' Gumbel stream (set by the gates part)
        self.learn_temperature = settings.learn_temperature
        self.insert_at_block = settings.insert_at_block
        self.pooling = pooling
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.image_size = image_size or vit.patch_embed.img_size[0]
        self.patch_size = vit.patch_embed.patch_size[0]
        self.grad_checkpointing = False
        self.extra_losses: List[torch.Tensor] = []  # loss terms parts added in the last forward pass
        self.targets: Optional[torch.Tensor] = None  # the batch's labels, set by the trainer for loss terms (DA-VPT)

        # frozen; fixed tensors (MoCo v3's sin-cos position embedding) stay fixed even under full tuning
        self.fixed_backbone_tensors = {n for n, p in vit.named_parameters() if not p.requires_grad}
        for p in vit.parameters():
            p.requires_grad_(False)
        self.prompt_dropout = nn.Dropout(settings.prompt_dropout)
        for name in PART_TENSORS:
            setattr(self, name, None)
        self.parts: List[Part] = []
        self._hooks: Dict[str, List[Part]] = {h: [] for h in ("begin", "tokens", "block", "mix")}
        for part in build_parts(self.settings):
            self.add_part(part)

        self.head = nn.Linear(self.embed_dim, num_classes)
        nn.init.kaiming_normal_(self.head.weight, a=0, mode="fan_out")
        nn.init.constant_(self.head.bias, -math.log((1 - 0.01) / 0.01))
        self.train(False)

    # -- parts, modes and tuned state ---------------------------------------------------------
    def add_part(self, part: Part) -> Part:
        """Attach ``part`` and call its hooks from now on (build_parts' parts; a new part under development)."""
        part.attach(self)
        self.parts.append(part)
        for hook in part.hooks:
            self._hooks[hook].append(part)
        return part

    def part(self, kind: str) -> Optional[Part]:
        """The part of this kind (prompts, gates, temperature, lora, ssf, adapter, bias, full), or None."""
        return next((p for p in self.parts if p.kind == kind), None)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # no drop-path / dropout in the backbone, ever
        for part in getattr(self, "parts", ()):
            for m in part.train_modules(self):  # trained modules inside it (adapters) follow the model
                m.train(mode)
        return self

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in the output sequence (CLS, registers, prompts)."""
        return self.backbone.num_prefix_tokens + self.num_prompts

    def tuned_parameters(self) -> Dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def num_tuned(self) -> int:
        """Trained scalars in all (what the report's parameter column counts per task)."""
        return sum(p.numel() for p in self.tuned_parameters().values())

    def _owner(self, name: str) -> str:
        if name.startswith("head."):
            return "head"
        generic = ("bias", "full")  # BitFit / full tuning own what no more specific part claims
        for part in sorted(self.parts, key=lambda p: p.kind in generic):
            if part.owns(name):
                return part.kind
        return "other"

    def tuned_counts(self) -> Dict[str, int]:
        """Trained scalars per part kind and the head, e.g. {"prompts": 300, "gates": 11, "lora": 294912,
        "head": 76900}; the values sum to ``num_tuned()``."""
        counts: Dict[str, int] = {}
        for name, p in self.tuned_parameters().items():
            owner = self._owner(name)
            counts[owner] = counts.get(owner, 0) + p.numel()
        return counts

    def param_groups(self, weight_decay: float, head_weight_decay: Optional[float] = None,
                     head_bias_decay: bool = True) -> List[dict]:
        """Optimizer groups: the trained tensors with ``weight_decay``, and apart (decay 0) those a part's
        official recipe keeps out of decay (SSF's gamma/beta, adapter biases). One group when there are none.
        ``head_weight_decay`` (None: ``weight_decay``): the head's weight (DA-VPT's wd_head), a group of its own;
        ``head_bias_decay=False``: the head's bias without decay (timm's 1-D rule)."""
        decay, no_decay, head = [], [], []
        parts = {p.kind: p for p in self.parts}
        for name, p in self.tuned_parameters().items():
            part = parts.get(self._owner(name))
            if name == "head.weight" and head_weight_decay is not None:
                head.append(p)
            elif part is not None and part.no_decay(name, p) or name == "head.bias" and not head_bias_decay:
                no_decay.append(p)
            else:
                decay.append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        if head:
            groups.append({"params": head, "weight_decay": float(head_weight_decay)})
        return groups

    def epoch_begin(self, epoch: int) -> None:
        """Before training epoch ``epoch`` (0-based): each part's ``epoch_begin`` (DA-VPT's re-clustering)."""
        for part in self.parts:
            part.epoch_begin(self, epoch)

    def epoch_end(self, epoch: int) -> None:
        for part in self.parts:
            part.epoch_end(self, epoch)

    def parts_state(self) -> dict:
        """The parts' state besides the trained tensors, for the resume file ({kind: state})."""
        return {p.kind: st for p in self.parts for st in [p.state(self)] if st is not None}

    def load_parts_state(self, states: dict) -> None:
        for part in self.parts:
            if part.kind in states:
                part.load_state(self, states[part.kind])

    def seed_gate_noise(self, seed: int) -> None:
        if self.gate_noise is not None:
            self.gate_noise.manual_seed(int(seed))

    def gate_values(self) -> Optional[torch.Tensor]:
        """g_l for l < L (soft: sigmoid(gamma); hard: 0/1, noisy in training), or None without gates."""
        return gate_values(self)

    def clamp_temperature_(self) -> None:
        clamp_temperature_(self)

    def prompt_insertions(self) -> List[Tuple[str, int, int]]:
        """(tensor name, row, 1-based block) where each prompt set enters: what data-driven inits fill."""
        part = self.part("prompts")
        return [] if part is None else part.insertions(self)

    def not_mergeable(self) -> List[str]:
        """One line per part that cannot fold into the frozen weights (empty: ``gapt.merge`` works)."""
        return [why for why in (p.not_mergeable() for p in self.parts) if why]

    @property
    def pos_embed_interpolation(self) -> str:
        """How the position embedding meets another patch grid: timm's bicubic unless the backbone
        was built with another mode (segmentation: bilinear, as SETR; see model/posembed.py)."""
        return getattr(self.backbone, "pos_embed_interpolation", "bicubic")

    # -- forward ----------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.backbone
        x = vit.patch_embed(images)
        if getattr(vit, "rope", None) is not None and x.ndim == 4:  # Eva: the patch grid its RoPE needs
            self._rope_grid = tuple(x.shape[1:3])
        if self.pos_embed_interpolation != "bicubic" and x.ndim == 4 and vit.pos_embed is not None:
            from .posembed import add_pos_embed
            x = add_pos_embed(vit, x, self.pos_embed_interpolation)
        else:
            x = vit._pos_embed(x)
        if isinstance(x, tuple):  # Eva: (tokens, rotary embedding); run_blocks rebuilds the latter
            return vit.norm_pre(x[0])
        return vit.norm_pre(vit.patch_drop(x))

    def rope(self, num_patches: int) -> Optional[torch.Tensor]:
        """The backbone's rotary embedding for ``num_patches`` patch tokens, or None for a backbone without
        RoPE. The grid: that of the last ``embed`` call, else the model's own, else a square."""
        rope = getattr(self.backbone, "rope", None)
        if rope is None:
            return None
        gh, gw = getattr(self, "_rope_grid", None) or self.backbone.patch_embed.grid_size  # embed's last grid
        if gh * gw != num_patches:
            gh, gw = self.backbone.patch_embed.grid_size
        if gh * gw != num_patches:
            gh = gw = math.isqrt(num_patches)
            if gh * gw != num_patches:
                raise ValueError(f"{num_patches} patch tokens are not a square grid")
        return rope.get_embed(shape=[gh, gw])

    def run_blocks(self, x: torch.Tensor, start: int = 0, collect: Iterable[int] = (),
                   attention_maps: Optional[list] = None) -> Tuple[torch.Tensor, Dict[int, torch.Tensor]]:
        """Blocks ``start``.. (0-based) on tokens ``x``; ``collect`` names 1-based blocks whose outputs to return."""
        collect, collected = set(collect), {}
        pre = self.backbone.num_prefix_tokens
        # prompts are absent at ``start`` (they enter at block >= 1, never inside a cached prefix)
        step = Step(prefix=pre, rope=self.rope(x.shape[1] - pre), targets=self.targets if self.training else None)
        for part in self._hooks["begin"]:
            part.begin(self, step)
        for i in range(start, self.depth):
            for part in self._hooks["tokens"]:
                x = part.tokens(self, i, x, step)
            call = BlockCall(rope=step.rope, probs=attention_maps)
            for part in self._hooks["block"]:
                part.block(self, i, call, step)
            x_in, blk = x, self.backbone.blocks[i]
            if self.grad_checkpointing and self.training and torch.is_grad_enabled() and attention_maps is None:
                x = checkpoint(block_forward, blk, x, call, use_reentrant=False)
            else:
                x = block_forward(blk, x, call)
            for part in self._hooks["mix"]:
                x = part.mix(self, i, x, x_in, step)
            if i + 1 in collect:
                collected[i + 1] = x
        self.extra_losses = step.losses
        return x, collected

    def forward_tokens(self, images: torch.Tensor, collect: Iterable[int] = ()):
        """(final tokens (B, S, D), {block: tokens}) before the final norm; for segmentation."""
        return self.run_blocks(self.embed(images), collect=collect)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        norm, pre, n_p = self.backbone.norm, self.backbone.num_prefix_tokens, self.num_prompts
        if self.pooling == "cls":
            return norm(x)[:, 0]
        if self.pooling == "mean":  # every token but CLS/registers, prompts included (MAE)
            return norm(x[:, pre:].mean(dim=1))
        if self.pooling == "mean_normed":  # the same tokens, normalised before the mean (I-JEPA, timm's avg)
            return norm(x[:, pre:]).mean(dim=1)
        if self.pooling == "mean_fc_norm":  # the VPT codebase's MAE readout: a fresh fc_norm (gamma 1, beta 0)
            return F.layer_norm(x[:, pre:].mean(dim=1), norm.normalized_shape, eps=norm.eps)
        if self.pooling == "img":
            return norm(x[:, pre + n_p:].mean(dim=1))
        return norm(x[:, pre:pre + n_p].mean(dim=1))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x, _ = self.run_blocks(self.embed(images))
        return self.pool(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images))

    # -- frozen leading blocks, cached (insertion sweep, linear probing) ----------------------
    @property
    def head_only(self) -> bool:
        """No part at all (linear probing): the pooled features are frozen."""
        return not self.parts

    @property
    def frozen_leading_blocks(self) -> int:
        """How many leading blocks see no trainable tensor (their outputs can be cached)."""
        if self.head_only:
            return self.depth
        return min(part.frozen_blocks(self) for part in self.parts)

    @torch.no_grad()
    def frozen_features(self, images: torch.Tensor) -> torch.Tensor:
        """What the first trainable tensor sees: pooled features (linear) or the tokens entering block k."""
        if self.head_only:
            return self.forward_features(images)
        x = self.embed(images)
        rope = self.rope(x.shape[1] - self.backbone.num_prefix_tokens)
        for i in range(self.frozen_leading_blocks):
            x = block_forward(self.backbone.blocks[i], x, BlockCall(rope=rope))
        return x

    def forward_from_frozen(self, frozen: torch.Tensor) -> torch.Tensor:
        """Logits from cached ``frozen_features`` outputs (equal to ``forward`` on the images)."""
        if self.head_only:
            return self.head(frozen)
        x, _ = self.run_blocks(frozen, start=self.frozen_leading_blocks)
        return self.head(self.pool(x))

    # -- analysis ---------------------------------------------------------------------------
    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Per block, the softmax attention (B, heads, S, S) including temperature and prompts."""
        maps: list = []
        self.run_blocks(self.embed(images), attention_maps=maps)
        return maps

    # -- files --------------------------------------------------------------------------------
    def save_tuned(self, path: str, extra: Optional[dict] = None) -> None:
        from .tuned import save_tuned
        save_tuned(self, path, extra)

    def load_tuned(self, path: str) -> "PromptedViT":
        from .tuned import load_tuned
        load_tuned(self, path)
        return self

    def save_peft(self, folder: str) -> None:
        """A HF peft adapter folder (LoRA + the head as ``modules_to_save``) for ``gapt.model.merge.timm_classifier``."""
        from .peft_io import save_peft
        save_peft(self, folder)

    def load_peft(self, folder: str) -> "PromptedViT":
        """Load a peft LoRA adapter trained on this timm ViT (``target_modules=["qkv"]``, head in ``modules_to_save``)."""
        from .peft_io import load_peft
        load_peft(self, folder)
        return self


def _check_settings(s: MethodSettings, names: Tuple[str, ...], depth: int) -> None:
    """The rules between a method's settings that need no part built (errors name the key)."""
    if s.pooling and s.pooling not in POOLINGS:
        raise ValueError(f"unknown pooling '{s.pooling}'; valid: {list(POOLINGS)}")
    has_prompts = any(n in PROMPT_METHODS for n in names)
    if "vpt-at-block" in names:
        if not 1 <= s.insert_at_block <= depth:
            raise ValueError(f"insert_at_block={s.insert_at_block} is outside the backbone's blocks 1..{depth}")
    elif s.insert_at_block != 1:
        raise ValueError(f"insert_at_block={s.insert_at_block} needs method='vpt-at-block' (got '{s.method}')")
    if s.gate_type not in GATE_TYPES:
        raise ValueError(f"unknown gate_type '{s.gate_type}'; valid: {list(GATE_TYPES)}")
    if not s.gate_temperature > 0:
        raise ValueError(f"gate_temperature must be > 0, got {s.gate_temperature}")
    if s.gate_type == "hard" and "gated" not in names:
        raise ValueError(f"gate_type='hard' needs method='gated' (got '{s.method}')")
    if s.learn_temperature and not has_prompts:
        raise ValueError(f"learn_temperature needs a prompt method {list(PROMPT_METHODS)}, got '{s.method}'")
    if (s.pooling or "mean") == "prompt" and not has_prompts:
        raise ValueError(f"pooling='prompt' needs a prompt method, got '{s.method}'")
    s.check_parts()


__all__ = ["PromptedViT", "METHODS", "PROMPT_METHODS", "TEMPERATURE_RANGE", "prompt_init_bound", "attention",
           "block_forward", "layer_scale", "hard_gates", "mix_prompts"]
