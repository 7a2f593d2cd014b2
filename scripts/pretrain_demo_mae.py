#!/usr/bin/env python
"""Pre-train the demo's micro ViT with MAE on procedural images and ship its encoder.

    python scripts/pretrain_demo_mae.py                       # the shipped recipe (~10 min, 2 CPU cores)
    python scripts/pretrain_demo_mae.py --steps 50 --out /tmp/x.safetensors   # a quick try

Masked autoencoding as in He et al. (2022): 75% of the 4x4 patches of a 32x32 image are
dropped at random, the encoder sees only the rest (plus CLS), a small transformer decoder
fills in mask tokens and predicts the pixels of every patch, and the loss is the MSE on the
*masked* patches against per-patch normalised pixels. Position embeddings are fixed 2-D
sin-cos in encoder and decoder. AdamW, linear warm-up, cosine decay.

Only the encoder is written, as a timm VisionTransformer state dict (timm key names, float32)
in safetensors with metadata: format "gapt-backbone", the architecture kwargs, the recipe and
the final loss. Runs are fully seeded and deterministic on CPU at a fixed thread count.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

# Idle OpenMP workers sleep instead of spinning: on a shared 2-core machine spinning workers
# made steps ~10x slower. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from functools import partial
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn
from timm.models.vision_transformer import Block, VisionTransformer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "gapt" / "demo" / "assets" / "mae_vit_micro.safetensors"

# VisionTransformer kwargs; ``norm_eps`` stands for norm_layer=partial(nn.LayerNorm, eps=norm_eps).
ARCHITECTURE: Dict[str, object] = {
    "img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 6, "num_heads": 4,
    "mlp_ratio": 4.0, "qkv_bias": True, "norm_eps": 1e-6, "num_classes": 0,
    "global_pool": "token",
}

RECIPE: Dict[str, object] = {
    "method": "MAE (normalised-pixel MSE on masked patches)",
    "data": "gapt.data.synthetic.generate_unlabelled (count/location/orientation/shape/random scenes)",
    "num_images": 100000,
    "augmentation": "random horizontal flip",
    "mask_ratio": 0.75,
    "decoder_embed_dim": 64, "decoder_depth": 2, "decoder_num_heads": 4,
    "pos_embed": "fixed 2-D sin-cos (encoder and decoder)",
    "optimizer": "AdamW", "betas": [0.9, 0.95], "weight_decay": 0.05,
    "lr": 1.5e-3, "min_lr": 1e-5, "warmup_steps": 500, "steps": 10000, "batch_size": 128,
    "schedule": "linear warm-up then cosine, per step",
    "seed": 0, "threads": 2, "dtype": "float32",
    "image_normalisation": "imagenet mean/std",
}


def build_encoder(arch: Optional[Dict[str, object]] = None) -> VisionTransformer:
    """The timm ViT that the shipped weights load into, with fixed sin-cos position embedding."""
    kw = dict(arch or ARCHITECTURE)
    eps = kw.pop("norm_eps")
    enc = VisionTransformer(norm_layer=partial(nn.LayerNorm, eps=eps), **kw)
    grid = enc.patch_embed.grid_size[0]
    with torch.no_grad():
        enc.pos_embed.copy_(sincos_pos_embed(enc.embed_dim, grid, cls_token=True).unsqueeze(0))
    enc.pos_embed.requires_grad_(False)
    return enc


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.double().reshape(-1, 1) * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed(dim: int, grid: int, cls_token: bool) -> torch.Tensor:
    """(grid*grid [+1], dim) 2-D sin-cos table, rows in raster order; CLS row is zero.

    Half the channels encode the column, half the row, each as [sin, cos] over geometric
    frequencies (MAE's recipe)."""
    if dim % 4:
        raise ValueError("sin-cos embedding needs dim divisible by 4")
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    table = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float()


class MaskedAutoencoder(nn.Module):
    """timm ViT encoder on the visible patches + a light transformer decoder on all positions."""

    def __init__(self, encoder: VisionTransformer, decoder_dim: int = 64, decoder_depth: int = 2,
                 decoder_heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        self.encoder = encoder
        self.patch = encoder.patch_embed.patch_size[0]
        grid = encoder.patch_embed.grid_size[0]
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed",
                             sincos_pos_embed(decoder_dim, grid, cls_token=True).unsqueeze(0))
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_dim, decoder_heads, mlp_ratio, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch * self.patch * 3)
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE's init: patch projection like a linear layer, tokens N(0, 0.02), xavier linears.
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, L, p*p*3), patches in raster order, pixels (row, col, channel)."""
        b, c, h, w = images.shape
        p = self.patch
        x = images.reshape(b, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)

    def forward(self, images: torch.Tensor, mask_ratio: float,
                generator: Optional[torch.Generator] = None):
        enc = self.encoder
        x = enc.patch_embed(images) + enc.pos_embed[:, 1:]
        b, length, dim = x.shape
        keep = max(1, int(round(length * (1 - mask_ratio))))
        noise = torch.rand(b, length, generator=generator)
        order = noise.argsort(dim=1)                   # first `keep` are visible
        restore = order.argsort(dim=1)
        visible = order[:, :keep]
        x = x.gather(1, visible[..., None].expand(-1, -1, dim))
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(b, -1, -1)
        x = enc.norm(enc.blocks(torch.cat([cls, x], dim=1)))

        y = self.decoder_embed(x)
        fill = self.mask_token.expand(b, length - keep, -1)
        patches = torch.cat([y[:, 1:], fill], dim=1)
        patches = patches.gather(1, restore[..., None].expand(-1, -1, y.shape[-1]))
        y = torch.cat([y[:, :1], patches], dim=1) + self.decoder_pos_embed
        y = self.decoder_pred(self.decoder_norm(self.decoder_blocks(y)))[:, 1:]

        mask = torch.ones(b, length)
        mask[:, :keep] = 0
        mask = mask.gather(1, restore)                  # 1 = masked, in patch order
        target = self.patchify(images)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (y - target).pow(2).mean(-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return loss, y, mask


def param_groups(model: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith("token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, recipe: Dict[str, object]) -> float:
    warm, total = int(recipe["warmup_steps"]), int(recipe["steps"])
    base, low = float(recipe["lr"]), float(recipe["min_lr"])
    if step < warm:
        return base * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return low + (base - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def to_input(batch_uint8: torch.Tensor, flip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> ImageNet-normalised float, optionally flipping marked images."""
    x = batch_uint8.float().div_(255.0)
    if flip is not None:
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    return (x - _MEAN) / _STD


def mae_step(model: MaskedAutoencoder, optimizer: torch.optim.Optimizer, images: torch.Tensor,
             mask_ratio: float, generator: Optional[torch.Generator] = None,
             lr: Optional[float] = None) -> float:
    """One MAE optimisation step on normalised images; returns the loss."""
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    model.train()
    loss, _, _ = model(images, mask_ratio, generator)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"MAE loss is {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def encoder_state(encoder: VisionTransformer) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float32).contiguous().clone()
            for k, v in encoder.state_dict().items()}


def pretrain(recipe: Dict[str, object], log_every: int = 100, on_checkpoint=None,
             checkpoint_every: int = 0, init: Optional[Path] = None) -> tuple:
    """Run the recipe; returns (encoder, final loss = mean of the last 100 steps, seconds).

    ``on_checkpoint(encoder, loss, seconds)`` is called every ``checkpoint_every`` steps.
    ``init``: continue from an encoder written by this script (a fresh decoder is trained with it)."""
    from gapt.data.synthetic import generate_unlabelled

    seed = int(recipe["seed"])
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    pool = torch.from_numpy(generate_unlabelled(int(recipe["num_images"]), seed))
    pool = pool.permute(0, 3, 1, 2).contiguous()
    print(f"rendered {len(pool)} unlabelled images in {time.time() - t0:.1f}s", flush=True)

    encoder = build_encoder()
    model = MaskedAutoencoder(encoder, int(recipe["decoder_embed_dim"]), int(recipe["decoder_depth"]),
                              int(recipe["decoder_num_heads"]))
    if init is not None:  # after the wrapper, whose MAE init re-initialises the encoder too
        from safetensors.torch import load_file
        encoder.load_state_dict(load_file(str(init)), strict=True)
    optimizer = torch.optim.AdamW(param_groups(model, float(recipe["weight_decay"])),
                                  lr=float(recipe["lr"]), betas=tuple(recipe["betas"]))
    steps, bs = int(recipe["steps"]), int(recipe["batch_size"])
    perm, cursor, recent = torch.randperm(len(pool), generator=gen), 0, []
    bar = None
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
            bar = tqdm(total=steps, desc="MAE pre-training", unit="step")
        except ImportError:
            bar = None
    for step in range(steps):
        if cursor + bs > len(pool):
            perm, cursor = torch.randperm(len(pool), generator=gen), 0
        idx = perm[cursor:cursor + bs]
        cursor += bs
        flip = torch.rand(bs, generator=gen) < 0.5
        loss = mae_step(model, optimizer, to_input(pool[idx], flip), float(recipe["mask_ratio"]),
                        gen, lr_at(step, recipe))
        recent = (recent + [loss])[-100:]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(recent):.4f}")
        elif step % log_every == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps}  loss {np.mean(recent):.4f}  "
                  f"lr {lr_at(step, recipe):.2e}  {time.time() - t0:.0f}s", flush=True)
        if on_checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            on_checkpoint(encoder, float(np.mean(recent)), time.time() - t0)
    if bar is not None:
        bar.close()
    return encoder, float(np.mean(recent)), time.time() - t0


def save_encoder(encoder: VisionTransformer, path: Path, recipe: Dict[str, object],
                 final_loss: float, seconds: float) -> None:
    from safetensors.torch import save_file

    metadata = {
        "format": "gapt-backbone",
        "architecture": json.dumps(ARCHITECTURE, sort_keys=True),
        "recipe": json.dumps(recipe, sort_keys=True),
        "final_loss": f"{final_loss:.6f}",
        "pretraining": "mae",
        "pooling": "mean",
        "pos_embed": "fixed 2-D sin-cos",
        "train_seconds": f"{seconds:.0f}",
        "torch": torch.__version__,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(encoder_state(encoder), str(path), metadata=metadata)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    ap.add_argument("--num-images", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--init", type=Path, default=None,
                    help="continue pre-training from an encoder this script wrote (new decoder, new schedule)")
    ap.add_argument("--lr", type=float, default=None, help="override the recipe's peak lr")
    ap.add_argument("--warmup-steps", type=int, default=None)
    ap.add_argument("--save-every", type=int, default=0,
                    help="also write the encoder every N steps (to watch a long run)")
    args = ap.parse_args(argv)

    recipe = dict(RECIPE)
    if args.steps is not None:
        recipe["steps"] = args.steps
        recipe["warmup_steps"] = min(int(recipe["warmup_steps"]), max(1, args.steps // 20))
    for key, value in (("num_images", args.num_images), ("seed", args.seed), ("threads", args.threads),
                       ("lr", args.lr), ("warmup_steps", args.warmup_steps)):
        if value is not None:
            recipe[key] = value
    if args.init is not None:
        # the recipe that made the starting point travels along, so the chain stays readable
        from safetensors import safe_open
        with safe_open(str(args.init), framework="pt") as f:
            meta = f.metadata() or {}
        recipe["init_from"] = {"file": args.init.name, "recipe": json.loads(meta.get("recipe", "{}")),
                               "final_loss": float(meta.get("final_loss", "nan")),
                               "train_seconds": float(meta.get("train_seconds", "nan"))}
    torch.set_num_threads(int(recipe["threads"]))
    torch.use_deterministic_algorithms(True)
    def checkpoint(encoder, loss, seconds):
        save_encoder(encoder, args.out, dict(recipe, stopped_at="checkpoint"), loss, seconds)

    encoder, final_loss, seconds = pretrain(recipe, on_checkpoint=checkpoint,
                                            checkpoint_every=args.save_every, init=args.init)
    save_encoder(encoder, args.out, recipe, final_loss, seconds)
    size_kb = os.path.getsize(args.out) / 1024
    print(f"final loss {final_loss:.4f} after {seconds:.0f}s; wrote {args.out} ({size_kb:.0f} KiB)")


if __name__ == "__main__":
    main()
