"""SETR-PUP decode head, auxiliary heads and the segmentation model around a prompted ViT.

Follows MMSegmentation's ``setr_vit-l_pup_8xb2-160k_ade20k`` recipe: the main head is
LayerNorm(eps 1e-6) over channels -> 4 x [conv3x3 -> BN -> ReLU -> bilinear x2] with 256
channels -> 1x1 conv; each auxiliary head is the same with 2 x [.. bilinear x4]. The recipe sets
``dropout_ratio=0`` on every head, so dropout before the classifier defaults to 0 here.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .transforms import IGNORE_INDEX


def tokens_to_map(tokens: torch.Tensor, num_prefix_tokens: int, grid_hw: Tuple[int, int]) -> torch.Tensor:
    """(B, prefix + h*w, D) tokens -> (B, D, h, w) patch map; CLS and prompt tokens are dropped."""
    b, s, d = tokens.shape
    h, w = grid_hw
    if s != num_prefix_tokens + h * w:
        raise ValueError(f"token sequence of length {s} does not match {num_prefix_tokens} prefix tokens "
                         f"+ a {h}x{w} patch grid")
    return tokens[:, num_prefix_tokens:].transpose(1, 2).reshape(b, d, h, w)


class SETRPUPHead(nn.Module):
    """SETR progressive-upsampling head on a (B, D, h, w) map; output (B, C, h*s^n, w*s^n)."""

    def __init__(self, embed_dim: int, num_classes: int, channels: int = 256, num_convs: int = 4,
                 up_scale: int = 2, norm_eps: float = 1e-6, dropout: float = 0.0, kernel_size: int = 3):
        super().__init__()
        if kernel_size not in (1, 3):
            raise ValueError(f"kernel_size must be 1 or 3, got {kernel_size}")
        self.up_scale = up_scale
        self.num_convs = num_convs
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        layers = []
        in_ch = embed_dim
        for _ in range(num_convs):
            layers.append(nn.Sequential(
                nn.Conv2d(in_ch, channels, kernel_size, padding=kernel_size // 2, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ))
            in_ch = channels
        self.up_convs = nn.ModuleList(layers)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(in_ch, num_classes, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # MMSegmentation's initialisation: kaiming (fan_out, relu) convs, unit norms, N(0, 0.01) classifier
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        for block in self.up_convs:
            conv, bn = block[0], block[1]
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.ones_(bn.weight)
            nn.init.zeros_(bn.bias)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    @property
    def total_up(self) -> int:
        return self.up_scale ** self.num_convs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # LayerNorm over channels
        for block in self.up_convs:
            x = F.interpolate(block(x), scale_factor=self.up_scale, mode="bilinear", align_corners=False)
        return self.conv_seg(self.dropout(x))


def seg_loss(outputs: Union[torch.Tensor, Dict[str, torch.Tensor]], labels: torch.Tensor,
             aux_weight: float = 0.4, ignore_index: int = IGNORE_INDEX,
             avg_non_ignore: bool = False) -> torch.Tensor:
    """Cross-entropy on ``main`` + ``aux_weight`` x each ``aux*`` output (logits resized to the label).

    ``avg_non_ignore=False`` is MMSegmentation's default (and the SETR recipe's): the summed loss
    of labelled pixels is divided by all pixels, ignored ones included; ``True`` divides by the
    labelled pixels only (plain ``F.cross_entropy``). A batch without labelled pixels gives 0.
    """
    if isinstance(outputs, torch.Tensor):
        outputs = {"main": outputs}
    if "main" not in outputs:
        raise KeyError(f"seg_loss needs a 'main' output, got {sorted(outputs)}")
    labels = labels.long()
    total = None
    for name, logits in outputs.items():
        if name != "main" and not name.startswith("aux"):
            raise KeyError(f"unexpected output '{name}' (expected 'main' or 'aux*')")
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        per_pixel = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
        if avg_non_ignore:
            loss = per_pixel.sum() / (labels != ignore_index).sum().clamp_min(1)
        else:
            loss = per_pixel.mean()
        loss = loss if name == "main" else aux_weight * loss
        total = loss if total is None else total + loss
    return total


class SegmentationModel(nn.Module):
    """A prompted ViT encoder with a SETR-PUP head and auxiliary heads on intermediate blocks.

    ``encoder`` must expose ``forward_tokens(images, collect) -> (tokens, {block: tokens})``
    (blocks 1-based, outputs before any final norm), ``num_prefix_tokens``, ``patch_size`` and
    ``embed_dim``. Inputs whose sides are not multiples of the patch size are zero-padded at the
    bottom / right (MMSegmentation's ``padding='corner'``) and the logits of the padded input resized
    (bilinear) to the input's size, as MMSegmentation does. ``forward`` returns ``{"main", "aux5", ...}``
    logits at input resolution in train mode and the main logits alone in eval mode.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, aux_blocks: Iterable[int] = (5, 9),
                 channels: int = 256, dropout: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        self.encoder = encoder
        self.num_classes = int(num_classes)
        self.aux_blocks: Tuple[int, ...] = tuple(int(b) for b in aux_blocks)
        depth = getattr(encoder, "depth", None)
        for b in self.aux_blocks:
            if b < 1 or (depth is not None and b > depth):
                raise ValueError(f"auxiliary block {b} is outside the encoder's blocks 1..{depth}")
        d = int(encoder.embed_dim)
        self.decode_head = SETRPUPHead(d, num_classes, channels, num_convs=4, up_scale=2,
                                       norm_eps=norm_eps, dropout=dropout)
        self.aux_heads = nn.ModuleDict({
            str(b): SETRPUPHead(d, num_classes, channels, num_convs=2, up_scale=4, norm_eps=norm_eps,
                                dropout=dropout)
            for b in self.aux_blocks})

    def head_parameters(self) -> List[nn.Parameter]:
        return list(self.decode_head.parameters()) + list(self.aux_heads.parameters())

    def param_groups(self, lr: float, head_lr_mult: float = 10.0) -> List[dict]:
        """Trainable parameters in two groups: encoder (``lr``) and heads (``lr * head_lr_mult``)."""
        head_ids = {id(p) for p in self.head_parameters()}
        enc = [p for p in self.encoder.parameters() if p.requires_grad and id(p) not in head_ids]
        heads = [p for p in self.head_parameters() if p.requires_grad]
        groups = [{"params": heads, "lr": lr * head_lr_mult, "name": "heads"}]
        if enc:
            groups.insert(0, {"params": enc, "lr": lr, "name": "encoder"})
        return groups

    def _decode(self, head: SETRPUPHead, tokens: torch.Tensor, grid: Tuple[int, int],
                size: Tuple[int, int]) -> torch.Tensor:
        prefix, n_prompts = self.encoder.num_prefix_tokens, getattr(self.encoder, "num_prompts", 0)
        if n_prompts and tokens.shape[1] == prefix - n_prompts + grid[0] * grid[1]:
            prefix -= n_prompts  # a block before vpt-at-block's insertion carries no prompts yet
        logits = head(tokens_to_map(tokens, prefix, grid))
        # MMSegmentation resizes the head's output (the padded input's size) to the input's own size
        # (0.x EncoderDecoder.encode_decode; 1.x decode_head.predict_by_feat to img_shape), never crops
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits

    def forward(self, images: torch.Tensor):
        h, w = images.shape[-2:]
        p = int(self.encoder.patch_size)
        ph, pw = -h % p, -w % p
        if ph or pw:  # MMSegmentation's ViT: PatchEmbed(padding='corner'), zeros at the bottom / right
            images = F.pad(images, (0, pw, 0, ph))
        grid = ((h + ph) // p, (w + pw) // p)
        collect = self.aux_blocks if self.training else ()
        tokens, inter = self.encoder.forward_tokens(images, collect=collect)
        main = self._decode(self.decode_head, tokens, grid, (h, w))
        if not self.training:
            return main
        out = {"main": main}
        for b in self.aux_blocks:
            if b not in inter:
                raise KeyError(f"encoder.forward_tokens did not return block {b} (got {sorted(inter)})")
            out[f"aux{b}"] = self._decode(self.aux_heads[str(b)], inter[b], grid, (h, w))
        return out
