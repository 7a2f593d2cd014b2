"""Checkpoint adapters: the official files people have -> a timm ViT state dict.

Files are read with ``torch.load(weights_only=True)`` or safetensors, never an arbitrary
unpickle. Known extra keys (MAE decoder, MoCo momentum encoder / predictor / head) are
dropped explicitly; anything else missing, unexpected or mis-shaped is an error that names it.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

log = logging.getLogger("gapt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and keys."""


def read_tensor_file(path: str) -> Dict:
    """Load a .pth/.pth.tar/.safetensors file as a (nested) dict without unpickling code."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(p))
        except (SafetensorError, Exception) as e:
            raise CheckpointError(f"{path} is not a readable safetensors checkpoint: {e}") from None
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a checkpoint torch can read safely (weights_only=True): "
                              f"{str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def _strip(sd: Dict, prefix: str) -> Dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _tensors_only(sd: Dict, path: str) -> Dict[str, torch.Tensor]:
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors (keys: {list(sd)[:8]})")
    return sd


def convert_checkpoint(raw: Dict, fmt: str, path: str = "<checkpoint>") -> Tuple[Dict[str, torch.Tensor], str]:
    """Official layout -> (timm-named encoder state dict, description of what was found)."""
    if fmt == "mae":
        if "model" in raw and isinstance(raw["model"], dict):
            sd, what = raw["model"], "MAE checkpoint ({'model': ...})"
        else:
            sd, what = raw, "MAE-style plain state dict"
        sd = {k: v for k, v in sd.items() if not (k.startswith("decoder_") or k == "mask_token")}
        return _tensors_only(sd, path), what
    if fmt == "mocov3":
        sd = raw.get("state_dict", raw)
        if any(k.startswith("module.base_encoder.") for k in sd):
            sd, what = _strip(sd, "module.base_encoder."), "MoCo v3 pre-training checkpoint (module.base_encoder.*)"
        elif any(k.startswith("module.") for k in sd):
            sd, what = _strip(sd, "module."), "MoCo v3 linear-probe checkpoint (module.*)"
        else:
            what = "MoCo v3-style plain state dict"
        # MoCo's projection head sits in `head.*`; the linear-probe head is `head.*` too.
        sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "momentum_encoder.", "predictor."))}
        return _tensors_only(sd, path), what
    if fmt in ("dino", "timm"):
        sd = raw
        for wrapper in ("model", "state_dict", "teacher"):
            if wrapper in sd and isinstance(sd[wrapper], dict):
                sd = sd[wrapper]
                break
        sd = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in sd.items()}
        sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm.")) or fmt == "timm"}
        return _tensors_only(sd, path), f"{fmt} state dict"
    raise CheckpointError(f"unknown checkpoint format '{fmt}'")


TIMM_FILTERED = ("timm", "dinov2", "ijepa", "dinov3")  # formats read by timm's own checkpoint_filter_fn


def filter_with_timm(raw: Dict, vit: torch.nn.Module, path: str = "<checkpoint>",
                     pos_embed_mode: str = "bicubic") -> Tuple[Dict[str, torch.Tensor], str]:
    """timm's ``checkpoint_filter_fn`` for the model's class (VisionTransformer, Eva): the official
    DINOv2 (``mask_token``, ``register_tokens``, 518-px position embedding), I-JEPA (``encoder`` with
    ``module.`` keys), DINOv3 (``storage_tokens``, ``ls1.gamma``, masked qkv bias) and CLIP layouts
    become the model's own keys, the position embedding resized to the model's grid. The strict
    key check (``load_into_vit``) follows. ``pos_embed_mode``: bicubic is timm's own resize (antialiased,
    as timm loads the file); bilinear is MMSegmentation's (no antialiasing)."""
    import sys
    module = sys.modules[type(vit).__module__]
    fn = getattr(module, "checkpoint_filter_fn", None)
    if fn is None:
        raise CheckpointError(f"timm has no checkpoint_filter_fn for {type(vit).__name__}; cannot read {path}")
    raw, which = select_ijepa_encoder(raw, getattr(vit, "ijepa_encoder", None), path)
    if "encoder" not in raw and not any(k in raw for k in ("model", "state_dict", "model_ema", "module")):
        raw, _ = convert_checkpoint(raw, "timm", path)  # DINO-style wrappers and backbone. prefixes
    import contextlib
    import io
    printed = io.StringIO()  # timm prints a line per skipped DINOv3 qkv bias; keep it out of the run's output
    try:
        with contextlib.redirect_stdout(printed):
            sd = fn(dict(raw), vit, interpolation=pos_embed_mode, antialias=pos_embed_mode == "bicubic")
    except Exception as e:  # noqa: BLE001 - a layout timm does not know: name the file
        raise CheckpointError(f"{path}: timm's checkpoint_filter_fn for {type(vit).__name__} cannot read it: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if printed.getvalue():
        log.debug("timm's checkpoint_filter_fn: %s", printed.getvalue().strip())
    what = f"checkpoint converted by timm's {module.__name__}.checkpoint_filter_fn"
    return _tensors_only(dict(sd), path), what + (f" (I-JEPA '{which}')" if which else "")


IJEPA_ENCODERS = ("target_encoder", "encoder")


def select_ijepa_encoder(raw: Dict, which: Optional[str], path: str = "<checkpoint>") -> Tuple[Dict, Optional[str]]:
    """(checkpoint for timm's filter, the I-JEPA encoder chosen or None).

    I-JEPA's training file (``src/train.py`` ``save_checkpoint``) is ``{'encoder', 'predictor',
    'target_encoder', 'opt', 'scaler', 'epoch', ...}``, each network's keys prefixed ``module.``
    (DDP). timm's ``checkpoint_filter_fn`` reads ``encoder``, the context encoder; the I-JEPA paper
    evaluates ``target_encoder`` (App. A.1), so that is the default here: the chosen encoder is handed
    to timm's filter under the ``encoder`` key it reads. ``which`` (a backbone's ``ijepa_encoder``)
    asks for one explicitly, and then the file must hold it; without it, a file holding only
    ``encoder`` is read as timm reads it.
    """
    if not any(isinstance(raw.get(k), dict) for k in IJEPA_ENCODERS):
        return raw, None  # not an I-JEPA file
    if which is not None and which not in IJEPA_ENCODERS:
        raise CheckpointError(f"unknown I-JEPA encoder '{which}'; valid: {list(IJEPA_ENCODERS)}")
    choice = which or ("target_encoder" if isinstance(raw.get("target_encoder"), dict) else "encoder")
    if not isinstance(raw.get(choice), dict):
        raise CheckpointError(f"{path} is an I-JEPA-style file without '{choice}' (keys: {sorted(raw)[:8]}); "
                              f"the backbone reads that encoder")
    log.info("I-JEPA file %s: loading its '%s'%s", path, choice,
             " (the target encoder, which I-JEPA evaluates)" if choice == "target_encoder" else
             " (the context encoder)")
    return {"encoder": raw[choice]}, choice


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: Tuple[int, int], num_prefix: int = 1,
                     mode: str = "bicubic", old_grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Interpolation (``mode``: bicubic as timm, bilinear as MMSegmentation's SETR; half-pixel
    centres, no antialiasing) of the patch part of a (1, prefix + h*w, D) position embedding;
    ``old_grid`` (h, w) defaults to a square grid."""
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    if old_grid is None:
        side = int(math.isqrt(grid.shape[1]))
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != grid.shape[1]:
        raise CheckpointError(f"position embedding with {grid.shape[1]} patch tokens is not a {old_grid} grid")
    grid = grid.reshape(1, old_grid[0], old_grid[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode=mode, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


CLASSIFIER_PREFIXES = ("head.", "fc_norm.")


def drop_classifier_head(sd: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor],
                         path: str = "<checkpoint>") -> Dict[str, torch.Tensor]:
    """A copy of ``sd`` without the checkpoint's classifier (``head.*``, and ``fc_norm.*`` where the
    model has none): gapt always puts its own head on the backbone, so a plain timm state_dict()
    loads. One log line names what was dropped; any other unexpected key stays an error."""
    dropped = sorted(k for k in sd if k.startswith(CLASSIFIER_PREFIXES) and k not in own)
    if dropped:
        log.info("dropped the checkpoint's classifier head (%s) from %s; gapt trains its own head",
                 ", ".join(dropped), path)
    return {k: v for k, v in sd.items() if k not in dropped}


def load_into_vit(vit: torch.nn.Module, sd: Dict[str, torch.Tensor], path: str = "<checkpoint>",
                  keep_model_pos_embed: bool = False, pos_embed_mode: str = "bicubic") -> None:
    """Strictly load ``sd`` into ``vit``: every mismatch is listed in one error.

    ``keep_model_pos_embed``: the model's own fixed position embedding (MoCo's sin-cos,
    rebuilt for the model's grid) wins over an interpolated copy of the checkpoint's.
    ``pos_embed_mode``: how a checkpoint's position embedding is resized to the model's grid.
    """
    own = vit.state_dict()
    sd = drop_classifier_head(sd, own, path)
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        if keep_model_pos_embed:
            sd["pos_embed"] = own["pos_embed"]
        else:
            n_prefix = getattr(vit, "num_prefix_tokens", 1)
            grid = tuple(vit.patch_embed.grid_size)
            log.info("interpolating position embedding %s -> grid %s (%s)", tuple(sd["pos_embed"].shape), grid,
                     pos_embed_mode)
            sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], grid, n_prefix, mode=pos_embed_mode)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short(unexpected)}")
        if shapes:
            parts.append(f"mis-shaped keys: {_short(shapes)}")
        raise CheckpointError(f"{path} does not fit the backbone: " + "; ".join(parts))
    vit.load_state_dict(sd, strict=True)


def _short(items, n: int = 12) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more
