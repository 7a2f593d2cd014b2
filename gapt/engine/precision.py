"""A run's numeric precision (``train.precision``) and the TF32 switches that go with it.

- ``fp32``: strict IEEE fp32. While the run lasts, TF32 is off for matmuls and cuDNN
  convolutions (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``,
  ``torch.set_float32_matmul_precision('highest')``); the previous switches are restored after.
  This is the reference's precision (the paper's code and MMSegmentation's SETR recipe).
- ``bf16``: autocast to bfloat16 (on CPU too); the TF32 switches are left as they are.
- ``auto``: bf16 on a GPU, fp32 (strict) on CPU.

Every results.json records the resolved precision and whether TF32 was on (:func:`precision_record`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, Optional

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(setting: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` elsewhere; ``fp32`` / ``bf16`` as given."""
    if setting not in PRECISIONS:
        raise ValueError(f"bad value for config key 'train.precision': {setting!r}; valid: {list(PRECISIONS)}")
    if setting == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return setting


def autocast_dtype_for(setting: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of a precision setting: bfloat16, or None for fp32 (no autocast)."""
    return torch.bfloat16 if resolve_precision(setting, device) == "bf16" else None


def tf32_switches() -> Dict[str, object]:
    """The process's TF32 switches as torch reports them now."""
    return {"matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def tf32_active(device: torch.device) -> bool:
    """Whether fp32 matmuls / convolutions on ``device`` may run in TF32 now (never on CPU)."""
    if device.type != "cuda":
        return False
    s = tf32_switches()
    return s["matmul_allow_tf32"] or s["cudnn_allow_tf32"] or s["float32_matmul_precision"] != "highest"


@contextmanager
def precision_scope(setting: str, device: torch.device) -> Iterator[Optional[torch.dtype]]:
    """Run a block at ``setting``'s precision; yields the autocast dtype (None for fp32).

    For fp32 the TF32 switches are turned off on entry and restored on exit (on CPU too, where
    they change nothing, so the behaviour is the same on every machine and testable without a GPU).
    """
    dtype = autocast_dtype_for(setting, device)
    if dtype is not None:
        yield dtype
        return
    saved = tf32_switches()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield None
    finally:
        torch.set_float32_matmul_precision(saved["float32_matmul_precision"])
        torch.backends.cuda.matmul.allow_tf32 = saved["matmul_allow_tf32"]
        torch.backends.cudnn.allow_tf32 = saved["cudnn_allow_tf32"]


def precision_record(setting: str, device: torch.device) -> Dict[str, object]:
    """results.json fields: ``precision`` (resolved: fp32 | bf16), ``precision_setting`` (the
    config value) and ``tf32`` (whether TF32 was allowed on the run's device). Call it inside
    :func:`precision_scope`, so it reports the switches the run ran with."""
    return {"precision": resolve_precision(setting, device), "precision_setting": setting,
            "tf32": tf32_active(device)}
