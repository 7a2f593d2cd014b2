"""Learning-rate schedule of SPEC §6: linear warm-up, then cosine decay to 0."""
from __future__ import annotations

import math


def warmup_cosine(position: float, warmup: float, total: float) -> float:
    """Multiplier of the base lr at ``position`` (in iterations or epochs)."""
    if position < warmup:
        return position / warmup
    if total <= warmup:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (position - warmup) / (total - warmup)))


class LRSchedule:
    """Per-iteration cosine (gapt's default) or the reference's per-epoch steps (``cosine_epoch``).

    The reference steps once per epoch: lr(e) = base * e / W for e < W, so epoch 0 runs at
    lr 0, then base * 0.5 * (1 + cos(pi * (e - W) / (E - W))).
    """

    def __init__(self, base_lr: float, epochs: int, warmup_epochs: int, steps_per_epoch: int, mode: str = "cosine"):
        if mode not in ("cosine", "cosine_epoch"):
            raise ValueError(f"unknown schedule '{mode}'; valid: cosine, cosine_epoch")
        self.base_lr, self.epochs, self.warmup, self.steps, self.mode = base_lr, epochs, warmup_epochs, steps_per_epoch, mode

    def lr(self, epoch: int, step: int) -> float:
        if self.mode == "cosine_epoch":
            return self.base_lr * warmup_cosine(epoch, self.warmup, self.epochs)
        position = epoch * self.steps + step
        return self.base_lr * warmup_cosine(position, self.warmup * self.steps, self.epochs * self.steps)

    def apply(self, optimizer, epoch: int, step: int) -> float:
        lr = self.lr(epoch, step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr
