"""Parts that train the backbone's own tensors in place: full fine-tuning and BitFit.

- ``full``: every backbone tensor (fixed ones, such as MoCo v3's sin-cos position embedding, stay fixed).
- ``bitfit`` (SPEC §12.6; the VPT codebase's ``tinytl-bias``): every backbone parameter whose name
  contains "bias" (patch embedding, qkv, proj, fc1, fc2, norm1, norm2 and the final norm), plus the head.
Both fold trivially: the trained tensors are the backbone's own.
"""
from __future__ import annotations

from .base import Part


class FullTuning(Part):
    name = kind = "full"

    def attach(self, model) -> None:
        for name, p in model.backbone.named_parameters():
            if name not in model.fixed_backbone_tensors:
                p.requires_grad_(True)

    def owns(self, name: str) -> bool:
        return name.startswith("backbone.")

    def not_mergeable(self) -> str:
        return ""


class BiasTuning(Part):
    name = "bitfit"
    kind = "bias"

    def attach(self, model) -> None:
        for name, p in model.backbone.named_parameters():
            if "bias" in name and name not in model.fixed_backbone_tensors:
                p.requires_grad_(True)

    def owns(self, name: str) -> bool:
        return name.startswith("backbone.") and "bias" in name

    def not_mergeable(self) -> str:
        return ""
