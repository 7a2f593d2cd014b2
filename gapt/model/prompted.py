"""The method on one screen: prompts, gates (GaPT) and temperatures (AAS) around frozen timm blocks.

Token sequence: [CLS (+ registers), p_1..p_Np, z_1..z_N]; prompts carry no position embedding.
  vpt-shallow   prompts enter at block 1 and flow through every block
  vpt-at-block  blocks 1..k-1 run prompt-free; prompts enter at block k and flow on
  vpt-deep      block l > 1 gets fresh prompts that replace the previous block's prompt outputs
  gated         Z_P^l = g_l * block_l(Z)_P + (1 - g_l) * Z_P^{l-1},  g_l = sigmoid(gamma_l), l < L
  temperature   block l's attention is softmax(Q K^T d^-0.5 / tau_l); tau clamped to [0.01, 10]
See SPEC §1-3. The backbone's own modules and weights are reused, never copied.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

METHODS = ("linear", "full", "vpt-shallow", "vpt-deep", "vpt-at-block", "gated")
PROMPT_METHODS = ("vpt-shallow", "vpt-deep", "vpt-at-block", "gated")
POOLINGS = ("mean", "cls", "img", "prompt")
TEMPERATURE_RANGE = (0.01, 10.0)


def attention(attn: nn.Module, x: torch.Tensor, temperature: Optional[torch.Tensor] = None,
              return_probs: bool = False):
    """timm Attention with a softmax temperature: scaling Q by 1/tau keeps the fused kernel."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
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


def block_forward(blk: nn.Module, x: torch.Tensor, temperature: Optional[torch.Tensor] = None) -> torch.Tensor:
    if temperature is None:
        return blk(x)  # timm's own (fused) path
    x = x + blk.drop_path1(blk.ls1(attention(blk.attn, blk.norm1(x), temperature)))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def mix_prompts(out: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """SPEC §2 on the prompt slice [start, start + count): g * out_P + (1 - g) * x_P.

    Written as x_P + g * (out_P - x_P): autograd then keeps only the (B, count, D) difference
    for the gate's gradient, not a view that holds the block's whole (B, S, D) output alive
    (measured: 17% less activation memory per image with checkpointing, same step time).
    """
    prompt_in = x[:, start:start + count]
    mixed = prompt_in + gate * (out[:, start:start + count] - prompt_in)
    return torch.cat([out[:, :start], mixed, out[:, start + count:]], dim=1)


def prompt_init_bound(patch_size: Sequence[int], embed_dim: int) -> float:
    """VPT's Xavier-uniform bound for prompts: sqrt(6 / (3 * ph * pw + D))."""
    return math.sqrt(6.0 / float(3 * patch_size[0] * patch_size[1] + embed_dim))


class PromptedViT(nn.Module):
    """A frozen timm VisionTransformer + one transfer method + a linear head."""

    def __init__(self, vit: nn.Module, *, method: str = "gated", num_prompts: int = 100,
                 num_classes: int = 1000, gate_init: float = 5.0, learn_temperature: bool = False,
                 insert_at_block: int = 1, prompt_dropout: float = 0.1, pooling: str = "mean",
                 backbone_name: str = "custom", class_names: Optional[List[str]] = None,
                 image_size: Optional[int] = None):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method '{method}'; valid: {list(METHODS)}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling '{pooling}'; valid: {list(POOLINGS)}")
        depth = len(vit.blocks)
        if method == "vpt-at-block":
            if not 1 <= insert_at_block <= depth:
                raise ValueError(f"insert_at_block={insert_at_block} is outside the backbone's blocks 1..{depth}")
        elif insert_at_block != 1:
            raise ValueError(f"insert_at_block={insert_at_block} needs method='vpt-at-block' (got '{method}')")
        if learn_temperature and method not in PROMPT_METHODS:
            raise ValueError(f"learn_temperature needs a prompt method {list(PROMPT_METHODS)}, got '{method}'")
        has_prompts = method in PROMPT_METHODS
        if has_prompts and num_prompts < 1:
            raise ValueError(f"method '{method}' needs num_prompts >= 1, got {num_prompts}")
        if pooling == "prompt" and not has_prompts:
            raise ValueError(f"pooling='prompt' needs a prompt method, got '{method}'")

        self.backbone = vit
        self.method = method
        self.backbone_name = backbone_name
        self.depth = depth
        self.embed_dim = vit.embed_dim
        self.num_prompts = num_prompts if has_prompts else 0
        self.gate_init = float(gate_init)
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
        if self.pos_embed_interpolation != "bicubic" and x.ndim == 4 and vit.pos_embed is not None:
            from .posembed import add_pos_embed
            x = add_pos_embed(vit, x, self.pos_embed_interpolation)
        else:
            x = vit._pos_embed(x)
        return vit.norm_pre(vit.patch_drop(x))

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
        for i in range(start, self.depth):
            blk = self.backbone.blocks[i]
            prompts = self._prompts(i, x.shape[0])
            if prompts is not None:
                inserted = i == self.insert_at_block - 1
                rest = x[:, pre:] if inserted else x[:, pre + n_p:]
                x = torch.cat([x[:, :pre], prompts, rest], dim=1)
            gated = self.gate_logits is not None and i < self.depth - 1
            x_in = x
            tau = self.temperature[i] if self.temperature is not None else None
            if attention_maps is not None:
                x = self._block_with_probs(blk, x, tau, attention_maps)
            elif self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block_forward, blk, x, tau, use_reentrant=False)
            else:
                x = block_forward(blk, x, tau)
            if gated:
                x = mix_prompts(x, x_in, self.gate_logits[i].sigmoid(), pre, n_p)
            if i + 1 in collect:
                collected[i + 1] = x
        return x, collected

    @staticmethod
    def _block_with_probs(blk, x, tau, sink: list) -> torch.Tensor:
        out, probs = attention(blk.attn, blk.norm1(x), tau, return_probs=True)
        sink.append(probs.detach())
        x = x + blk.ls1(out)
        return x + blk.ls2(blk.mlp(blk.norm2(x)))

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
        if self.pooling == "img":
            return norm(x[:, pre + n_p:].mean(dim=1))
        return norm(x[:, pre:pre + n_p].mean(dim=1))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        self.clamp_temperature_()
        x, _ = self.run_blocks(self.embed(images))
        return self.pool(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images))

    # -- frozen-prefix cache (insertion sweep, linear probing) ------------------------------
    @property
    def frozen_prefix_blocks(self) -> int:
        """How many leading blocks see no trainable tensor (their outputs can be cached)."""
        if self.method == "linear":
            return self.depth
        if self.method == "vpt-at-block" and self.temperature is None:
            return self.insert_at_block - 1
        return 0

    @torch.no_grad()
    def frozen_prefix(self, images: torch.Tensor) -> torch.Tensor:
        """What the first trainable tensor sees: pooled features (linear) or the tokens entering block k."""
        if self.method == "linear":
            return self.forward_features(images)
        x = self.embed(images)
        for i in range(self.frozen_prefix_blocks):
            x = self.backbone.blocks[i](x)
        return x

    def forward_from_prefix(self, prefix: torch.Tensor) -> torch.Tensor:
        """Logits from cached ``frozen_prefix`` outputs (equal to ``forward`` on the images)."""
        if self.method == "linear":
            return self.head(prefix)
        self.clamp_temperature_()
        x, _ = self.run_blocks(prefix, start=self.frozen_prefix_blocks)
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
