"""Google's original ViT ``.npz`` layout (``imagenet21k_ViT-B_16.npz``, VPT's supervised backbone; SPEC §11).

timm's own loader (``vision_transformer._load_weights``) does the transposition from JAX's
layout; gapt only adds its strict check first: every key a ViT of this depth needs must be in
the file, and every other key must be one we know to drop (the classifier ``head/*`` and the
``pre_logits/*`` layer), so a file from another architecture is an error naming the keys, not
a model that silently keeps random tensors.
"""
from __future__ import annotations

import logging
from typing import List

import torch

from .checkpoints import CheckpointError, _short

log = logging.getLogger("gapt")

DROPPED_PREFIXES = ("head/", "pre_logits/")


def expected_keys(depth: int) -> List[str]:
    """The keys of Google's ViT layout (no prefix) for a ``depth``-block encoder."""
    keys = ["embedding/kernel", "embedding/bias", "cls", "Transformer/posembed_input/pos_embedding",
            "Transformer/encoder_norm/scale", "Transformer/encoder_norm/bias"]
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            keys += [f"{b}{ln}/scale", f"{b}{ln}/bias"]
        for part in ("query", "key", "value", "out"):
            keys += [f"{b}MultiHeadDotProductAttention_1/{part}/kernel", f"{b}MultiHeadDotProductAttention_1/{part}/bias"]
        for d in ("Dense_0", "Dense_1"):
            keys += [f"{b}MlpBlock_3/{d}/kernel", f"{b}MlpBlock_3/{d}/bias"]
    return keys


@torch.no_grad()
def load_google_npz(vit, path: str, spec=None, pos_embed_mode: str = "bicubic") -> str:
    """Load ``path`` (Google ViT .npz) into the timm ``vit`` in place; returns a description.

    When the file's position grid differs from ``vit``'s, timm's loader fills a ViT of the file's
    own grid (built from ``spec``) and gapt's strict loader resizes it (``pos_embed_mode``), as
    for every other checkpoint, rather than timm's fixed bilinear resampling."""
    import numpy as np
    from pathlib import Path

    from timm.models.vision_transformer import _load_weights

    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            names = list(f.files)
    except Exception as e:  # noqa: BLE001 - not an npz at all
        raise CheckpointError(f"{path} is not a readable .npz file: {e}") from None
    want = expected_keys(len(vit.blocks))
    missing = sorted(set(want) - set(names))
    unexpected = sorted(k for k in set(names) - set(want) if not k.startswith(DROPPED_PREFIXES))
    if missing or unexpected:
        parts = ([f"missing keys: {_short(missing)}"] if missing else []) + \
                ([f"unexpected keys: {_short(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{path} does not fit the backbone as Google's ViT .npz layout "
                              f"(Transformer/encoderblock_i/...): " + "; ".join(parts))
    with np.load(path, allow_pickle=False) as f:
        n_pos = f["Transformer/posembed_input/pos_embedding"].shape[1] - 1
    grid = int(round(n_pos ** 0.5))
    target = vit
    if spec is not None and grid * grid == n_pos and tuple(vit.patch_embed.grid_size) != (grid, grid):
        from .backbones import create_vit
        target = create_vit(spec, grid * vit.patch_embed.patch_size[0])
    try:
        _load_weights(target, path)
    except (RuntimeError, ValueError) as e:  # a shape that does not fit
        raise CheckpointError(f"{path} does not fit the backbone: {str(e).splitlines()[0]}") from None
    if target is not vit:
        from .checkpoints import load_into_vit
        load_into_vit(vit, target.state_dict(), path, pos_embed_mode=pos_embed_mode)
    dropped = [k for k in names if k.startswith(DROPPED_PREFIXES)]
    if dropped:
        log.info("dropped the file's classifier (%s)", ", ".join(sorted({k.split('/')[0] for k in dropped})))
    return "Google ViT .npz (Transformer/encoderblock_i/...)"
