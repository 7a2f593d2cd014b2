"""The method on one screen: prompts, gates (GaPT) and temperatures (AAS) around frozen timm blocks.

Token sequence: [CLS (+ registers), p_1..p_Np, z_1..z_N]; prompts carry no position embedding.
  vpt-shallow   prompts enter at block 1 and flow through every block
  vpt-at-block  blocks 1..k-1 run prompt-free; prompts enter at block k and flow on
  vpt-deep      block l > 1 gets fresh prompts that replace the previous block's prompt outputs
  gated         Z_P^l = g_l * block_l(Z)_P + (1 - g_l) * Z_P^{l-1},  g_l = sigmoid(gamma_l), l < L
  hard gates    g_l in {0, 1}: Gumbel-Sigmoid + straight-through in training, 1[gamma_l > 0] in eval (SPEC §9)
  temperature   block l's attention is softmax(Q K^T d^-0.5 / tau_l); tau clamped to [0.01, 10]
  RoPE (Eva, e.g. DINOv3)  rotary position on the patch tokens only: CLS, registers and prompts
                are prefix tokens without position, wherever the prompts enter
See SPEC §1-3. The backbone's own modules and weights are reused, never copied.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..method import GATE_TYPES, METHODS, POOLINGS, PROMPT_METHODS, MethodSettings

TEMPERATURE_RANGE = (0.01, 10.0)


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
              return_probs: bool = False, rope: Optional[torch.Tensor] = None):
    """timm Attention with a softmax temperature: scaling Q by 1/tau keeps the fused kernel.

    ``rope`` (Eva): the rotary embedding of the patch grid, applied to the last ``len(rope)``
    tokens (the patches) only, never to the prefix tokens (CLS, registers, prompts).
    """
    B, N, _ = x.shape
    q, k, v = _qkv(attn, x)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        from timm.layers import apply_rot_embed_cat
        n, half = rope.shape[-2], getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :N - n], apply_rot_embed_cat(q[:, :, N - n:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :N - n], apply_rot_embed_cat(k[:, :, N - n:], rope, half=half)], dim=2).type_as(v)
    if temperature is not None:
        q = q / temperature.to(q.dtype)
    probs = None
    if return_probs:  # explicit softmax, for attention maps
        probs = (q * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1)
        out = probs @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v)
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


def block_forward(blk: nn.Module, x: torch.Tensor, temperature: Optional[torch.Tensor] = None,
                  rope: Optional[torch.Tensor] = None) -> torch.Tensor:
    if temperature is None and rope is None:
        return blk(x)  # timm's own (fused) path
    if temperature is None and x.shape[1] - rope.shape[-2] == blk.attn.num_prefix_tokens:
        return blk(x, rope=rope)  # Eva without prompts: timm's own path
    x = x + blk.drop_path1(layer_scale(blk, 1, attention(blk.attn, blk.norm1(x), temperature, rope=rope)))
    return x + blk.drop_path2(layer_scale(blk, 2, blk.mlp(blk.norm2(x))))


def mix_prompts(out: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """SPEC §2 on the prompt slice [start, start + count): g * out_P + (1 - g) * x_P.

    Written as x_P + g * (out_P - x_P): autograd then keeps only the (B, count, D) difference
    for the gate's gradient, not a view that holds the block's whole (B, S, D) output alive
    (measured: 17% less activation memory per image with checkpointing, same step time).
    """
    prompt_in = x[:, start:start + count]
    mixed = prompt_in + gate * (out[:, start:start + count] - prompt_in)
    return torch.cat([out[:, :start], mixed, out[:, start + count:]], dim=1)


def hard_gates(gate_logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """SPEC §9 in training: s = sigmoid((gamma + G1 - G2) / t), forward 1[s > 0.5], gradient of s.

    The Gumbel noise comes from ``generator`` (on the CPU, so a resume file can hold its state).
    ``hard + s - s.detach()`` is exactly 0 or 1 in value and carries d s / d gamma backward.
    """
    u = torch.rand(2, *gate_logits.shape, generator=generator).clamp_(1e-10, 1 - 1e-10)
    gumbel = -torch.log(-torch.log(u))
    noise = (gumbel[0] - gumbel[1]).to(gate_logits.device, gate_logits.dtype)
    s = torch.sigmoid((gate_logits + noise) / temperature)
    return (s > 0.5).to(s.dtype) + s - s.detach()


def prompt_init_bound(patch_size: Sequence[int], embed_dim: int) -> float:
    """VPT's Xavier-uniform bound for prompts: sqrt(6 / (3 * ph * pw + D))."""
    return math.sqrt(6.0 / float(3 * patch_size[0] * patch_size[1] + embed_dim))


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


class PromptedViT(nn.Module):
    """A frozen timm VisionTransformer + one transfer method + a linear head."""

    def __init__(self, vit: nn.Module, settings: Optional[MethodSettings] = None, *, num_classes: int = 1000,
                 backbone_name: str = "custom", class_names: Optional[List[str]] = None,
                 image_size: Optional[int] = None, **changes):
        """``settings`` (or its fields as keywords: method=..., num_prompts=..., ...) choose the method;
        pooling "" means mean pooling here (``build_model`` resolves it to the backbone's rule)."""
        super().__init__()
        settings = MethodSettings.of(settings, **changes)
        method, num_prompts, pooling = settings.method, settings.num_prompts, settings.pooling or "mean"
        gate_init, learn_temperature = settings.gate_init, settings.learn_temperature
        insert_at_block, prompt_dropout = settings.insert_at_block, settings.prompt_dropout
        gate_type, gate_temperature = settings.gate_type, settings.gate_temperature
        if method not in METHODS:
            raise ValueError(f"unknown method '{method}'; valid: {list(METHODS)}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling '{pooling}'; valid: {list(POOLINGS)}")
        depth = len(vit.blocks)
        check_backbone_blocks(vit)
        if method == "vpt-at-block":
            if not 1 <= insert_at_block <= depth:
                raise ValueError(f"insert_at_block={insert_at_block} is outside the backbone's blocks 1..{depth}")
        elif insert_at_block != 1:
            raise ValueError(f"insert_at_block={insert_at_block} needs method='vpt-at-block' (got '{method}')")
        if gate_type not in GATE_TYPES:
            raise ValueError(f"unknown gate_type '{gate_type}'; valid: {list(GATE_TYPES)}")
        if gate_type == "hard" and method != "gated":
            raise ValueError(f"gate_type='hard' needs method='gated' (got '{method}')")
        if not gate_temperature > 0:
            raise ValueError(f"gate_temperature must be > 0, got {gate_temperature}")
        if learn_temperature and method not in PROMPT_METHODS:
            raise ValueError(f"learn_temperature needs a prompt method {list(PROMPT_METHODS)}, got '{method}'")
        has_prompts = method in PROMPT_METHODS
        if has_prompts and num_prompts < 1:
            raise ValueError(f"method '{method}' needs num_prompts >= 1, got {num_prompts}")
        if pooling == "prompt" and not has_prompts:
            raise ValueError(f"pooling='prompt' needs a prompt method, got '{method}'")

        self.backbone = vit
        # what the tuned file records: prompts counted only where the method has them, pooling resolved
        self.settings = MethodSettings.of(settings, num_prompts=num_prompts if has_prompts else 0, pooling=pooling,
                                          gate_init=float(gate_init))
        self.method = method
        self.backbone_name = backbone_name
        self.depth = depth
        self.embed_dim = vit.embed_dim
        self.num_prompts = num_prompts if has_prompts else 0
        self.gate_init = float(gate_init)
        self.gate_type = gate_type
        self.gate_temperature = float(gate_temperature)
        # the hard gates' Gumbel noise: its own seeded stream (trainer: seed_gate_noise, resume state)
        self.gate_noise = torch.Generator().manual_seed(0) if gate_type == "hard" else None
        self.learn_temperature = learn_temperature
        self.insert_at_block = insert_at_block
        self.pooling = pooling
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.image_size = image_size or vit.patch_embed.img_size[0]
        self.patch_size = vit.patch_embed.patch_size[0]
        self.grad_checkpointing = False

        for p in vit.parameters():  # frozen unless full fine-tuning; fixed embeddings stay fixed
            p.requires_grad_(method == "full" and p.requires_grad)

        self.prompt_dropout = nn.Dropout(prompt_dropout)
        self.prompt_embeddings = self.deep_prompt_embeddings = None
        self.gate_logits = self.temperature = None
        if has_prompts:
            bound = prompt_init_bound(vit.patch_embed.patch_size, self.embed_dim)
            self.prompt_embeddings = nn.Parameter(torch.empty(1, num_prompts, self.embed_dim).uniform_(-bound, bound))
            if method == "vpt-deep":  # blocks 2..L
                self.deep_prompt_embeddings = nn.Parameter(
                    torch.empty(depth - 1, num_prompts, self.embed_dim).uniform_(-bound, bound))
        if method == "gated":  # one gate per block but the last
            self.gate_logits = nn.Parameter(torch.full((depth - 1,), -float(gate_init)))
        if learn_temperature:
            self.temperature = nn.Parameter(torch.ones(depth))

        self.head = nn.Linear(self.embed_dim, num_classes)
        nn.init.kaiming_normal_(self.head.weight, a=0, mode="fan_out")
        nn.init.constant_(self.head.bias, -math.log((1 - 0.01) / 0.01))
        self.train(False)

    # -- modes and tuned state ------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # no drop-path / dropout in the backbone, ever
        return self

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in the output sequence (CLS, registers, prompts)."""
        return self.backbone.num_prefix_tokens + self.num_prompts

    def tuned_parameters(self) -> Dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def num_tuned(self) -> int:
        return sum(p.numel() for p in self.tuned_parameters().values())

    def seed_gate_noise(self, seed: int) -> None:
        if self.gate_noise is not None:
            self.gate_noise.manual_seed(int(seed))

    def gate_values(self) -> Optional[torch.Tensor]:
        """g_l for l < L: sigmoid(gamma) (soft); 0/1 from the sign of gamma (hard, eval) or noisy (hard, train)."""
        if self.gate_logits is None:
            return None
        if self.gate_type == "soft":
            return self.gate_logits.sigmoid()
        if not self.training:
            return (self.gate_logits > 0).to(self.gate_logits.dtype)
        return hard_gates(self.gate_logits, self.gate_temperature, self.gate_noise)

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        """Projection of tau onto [0.01, 10], outside the autograd graph (SPEC §3)."""
        if self.temperature is not None:
            self.temperature.clamp_(*TEMPERATURE_RANGE)

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

    def _prompts(self, block_index: int, batch: int) -> Optional[torch.Tensor]:
        """Prompts inserted at the input of block ``block_index`` (0-based), or None."""
        if self.prompt_embeddings is None:
            return None
        if block_index == self.insert_at_block - 1:
            p = self.prompt_embeddings
        elif self.deep_prompt_embeddings is not None and block_index > 0:
            p = self.deep_prompt_embeddings[block_index - 1][None]
        else:
            return None
        return self.prompt_dropout(p.expand(batch, -1, -1))  # a dropout mask per sample

    def run_blocks(self, x: torch.Tensor, start: int = 0, collect: Iterable[int] = (),
                   attention_maps: Optional[list] = None) -> Tuple[torch.Tensor, Dict[int, torch.Tensor]]:
        """Blocks ``start``.. (0-based) on tokens ``x``; ``collect`` names 1-based blocks whose outputs to return."""
        pre, n_p = self.backbone.num_prefix_tokens, self.num_prompts
        collect, collected = set(collect), {}
        gates = self.gate_values()  # once per forward: one noise draw per step for hard gates
        # prompts are absent at ``start`` (they enter at block >= 1, never inside a cached prefix)
        rope = self.rope(x.shape[1] - pre)
        for i in range(start, self.depth):
            blk = self.backbone.blocks[i]
            prompts = self._prompts(i, x.shape[0])
            if prompts is not None:
                inserted = i == self.insert_at_block - 1
                rest = x[:, pre:] if inserted else x[:, pre + n_p:]
                x = torch.cat([x[:, :pre], prompts, rest], dim=1)
            gated = gates is not None and i < self.depth - 1
            x_in = x
            tau = self.temperature[i] if self.temperature is not None else None
            if attention_maps is not None:
                x = self._block_with_probs(blk, x, tau, attention_maps, rope)
            elif self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block_forward, blk, x, tau, rope, use_reentrant=False)
            else:
                x = block_forward(blk, x, tau, rope)
            if gated:
                x = mix_prompts(x, x_in, gates[i], pre, n_p)
            if i + 1 in collect:
                collected[i + 1] = x
        return x, collected

    @staticmethod
    def _block_with_probs(blk, x, tau, sink: list, rope=None) -> torch.Tensor:
        out, probs = attention(blk.attn, blk.norm1(x), tau, return_probs=True, rope=rope)
        sink.append(probs.detach())
        x = x + layer_scale(blk, 1, out)
        return x + layer_scale(blk, 2, blk.mlp(blk.norm2(x)))

    def forward_tokens(self, images: torch.Tensor, collect: Iterable[int] = ()):
        """(final tokens (B, S, D), {block: tokens}) before the final norm; for segmentation."""
        self.clamp_temperature_()
        return self.run_blocks(self.embed(images), collect=collect)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        norm, pre, n_p = self.backbone.norm, self.backbone.num_prefix_tokens, self.num_prompts
        if self.pooling == "cls":
            return norm(x)[:, 0]
        if self.pooling == "mean":  # every token but CLS/registers, prompts included (MAE)
            return norm(x[:, pre:].mean(dim=1))
        if self.pooling == "mean_normed":  # the same tokens, normalised before the mean (I-JEPA, timm's avg)
            return norm(x[:, pre:]).mean(dim=1)
        if self.pooling == "img":
            return norm(x[:, pre + n_p:].mean(dim=1))
        return norm(x[:, pre:pre + n_p].mean(dim=1))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        self.clamp_temperature_()
        x, _ = self.run_blocks(self.embed(images))
        return self.pool(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images))

    # -- frozen leading blocks, cached (insertion sweep, linear probing) ----------------------
    @property
    def frozen_leading_blocks(self) -> int:
        """How many leading blocks see no trainable tensor (their outputs can be cached)."""
        if self.method == "linear":
            return self.depth
        if self.method == "vpt-at-block" and self.temperature is None:
            return self.insert_at_block - 1
        return 0

    @torch.no_grad()
    def frozen_features(self, images: torch.Tensor) -> torch.Tensor:
        """What the first trainable tensor sees: pooled features (linear) or the tokens entering block k."""
        if self.method == "linear":
            return self.forward_features(images)
        x = self.embed(images)
        rope = self.rope(x.shape[1] - self.backbone.num_prefix_tokens)
        for i in range(self.frozen_leading_blocks):
            x = block_forward(self.backbone.blocks[i], x, None, rope)
        return x

    def forward_from_frozen(self, frozen: torch.Tensor) -> torch.Tensor:
        """Logits from cached ``frozen_features`` outputs (equal to ``forward`` on the images)."""
        if self.method == "linear":
            return self.head(frozen)
        self.clamp_temperature_()
        x, _ = self.run_blocks(frozen, start=self.frozen_leading_blocks)
        return self.head(self.pool(x))

    # -- analysis ---------------------------------------------------------------------------
    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Per block, the softmax attention (B, heads, S, S) including temperature and prompts."""
        self.clamp_temperature_()
        maps: list = []
        self.run_blocks(self.embed(images), attention_maps=maps)
        return maps

    # -- tuned-state files ------------------------------------------------------------------
    def save_tuned(self, path: str, extra: Optional[dict] = None) -> None:
        from .tuned import save_tuned
        save_tuned(self, path, extra)

    def load_tuned(self, path: str) -> "PromptedViT":
        from .tuned import load_tuned
        load_tuned(self, path)
        return self
