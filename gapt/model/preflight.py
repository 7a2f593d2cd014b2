"""Checks of a model's settings that need no data and no weights loaded: run before any work.

A misspelled backbone, a missing weights file, an image size the patches do not tile and an
insertion block beyond the depth are reported here, before datasets are scanned, caches built
or a run folder written. Each error names the config key at fault.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Tuple

from ..config import ConfigError
from .backbones import BACKBONES, BackboneSpec, suggest_backbone


class ModelSettingsError(ConfigError):
    """A model setting that cannot work; the message names the config key and value."""


def _timm_knows(name: str) -> bool:
    import timm  # only for names the registry does not hold
    return bool(timm.is_model(name) or timm.is_model(name.split(".")[0]))


def check_backbone_name(name: str) -> Optional[BackboneSpec]:
    """The registered spec, None for a name timm knows, else an error with a did-you-mean."""
    if name in BACKBONES:
        return BACKBONES[name]
    if _timm_knows(name):
        return None
    registered = [n for n in BACKBONES if not n.startswith("test_")] or list(BACKBONES)
    close = suggest_backbone(name)  # a registered name, else one from timm.list_models()
    hint = f" (did you mean '{close}'?)" if close else ""
    raise ModelSettingsError(f"bad value for config key 'backbone': unknown backbone '{name}'{hint}; registered: "
                             f"{', '.join(sorted(registered))}, or any timm ViT name (`gapt backbones` lists them)")


def _patch_and_depth(name: str, spec: Optional[BackboneSpec]) -> Tuple[Optional[int], Optional[int]]:
    if spec is not None and spec.arch:
        return spec.arch.get("patch_size"), spec.arch.get("depth")
    m = re.search(r"patch(\d+)", name)  # timm names carry the patch size (vit_base_patch16_224)
    return (int(m.group(1)) if m else None), None


def check_model_settings(backbone: str, weights: Optional[str], image_size: int, method: str,
                         insert_at_block: int, size_key: str = "image_size") -> None:
    """Raise ModelSettingsError for the first setting that cannot work (see the module docstring)."""
    spec = check_backbone_name(backbone)
    if weights == "timm":
        if spec is not None and not spec.timm_name:
            raise ModelSettingsError(f"bad value for config key 'weights': backbone '{backbone}' has no timm hub "
                                     f"weights; give a checkpoint path")
    elif weights is not None and not Path(weights).is_file():
        raise ModelSettingsError(f"bad value for config key 'weights': checkpoint file not found: {weights}")
    patch, depth = _patch_and_depth(backbone, spec)
    if patch and image_size % patch:
        lower, upper = image_size // patch * patch, (image_size // patch + 1) * patch
        raise ModelSettingsError(f"bad value for config key '{size_key}': {image_size} is not a multiple of "
                                 f"backbone '{backbone}''s patch size {patch} (e.g. {lower or upper} or {upper})")
    at_block = "vpt-at-block" in str(method).split("+")
    if at_block and depth and insert_at_block > depth:
        raise ModelSettingsError(f"bad value for config key 'insert_at_block': {insert_at_block}, but backbone "
                                 f"'{backbone}' has {depth} blocks (1..{depth})")
    if not at_block and insert_at_block != 1:
        raise ModelSettingsError(f"bad value for config key 'insert_at_block': {insert_at_block} needs "
                                 f"method=vpt-at-block (got '{method}')")
