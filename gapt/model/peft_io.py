"""HF peft adapter folders <-> gapt LoRA models (without importing peft).

A peft LoRA adapter of a timm ViT (``LoraConfig(target_modules=["qkv"], modules_to_save=["head"])``) is a
folder with ``adapter_config.json`` and ``adapter_model.safetensors`` holding
``base_model.model.blocks.<i>.attn.qkv.lora_{A,B}.weight`` and ``base_model.model.head.{weight,bias}``.
gapt's LoRA part keeps peft's layout (``blocks.<i>.attn.qkv.lora_A`` ...), so both directions are a
renaming. ``lora_targets=q,v`` exports exactly as a fused-qkv adapter of rank 2r: A = [A_q; A_v],
B = [[B_q, 0], [0, 0], [0, B_v]], alpha doubled so that alpha / r stays the same.
The timm model the adapter fits is ``gapt.model.merge.timm_classifier(model, merged=False)``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import torch

from .checkpoints import CheckpointError

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _lora_layers(model) -> Dict[int, "object"]:
    from .parts import LoraLinear
    part = model.part("lora")
    if part is None:
        raise ValueError(f"peft adapters hold LoRA: method '{model.method}' has no lora part")
    return {i: blk.attn.qkv for i, blk in enumerate(model.backbone.blocks) if isinstance(blk.attn.qkv, LoraLinear)}


def save_peft(model, folder: str) -> None:
    """Write ``model``'s LoRA and head as a peft adapter folder (``PeftModel.from_pretrained`` reads it)."""
    from .tuned import write_safetensors
    others = [p.name for p in model.parts if p.kind != "lora"]
    if others:
        raise ValueError(f"a peft LoRA adapter holds LoRA and the head only; method '{model.method}' also trains "
                         f"{', '.join(others)}")
    layers = _lora_layers(model)
    part = model.part("lora")
    tensors: Dict[str, torch.Tensor] = {}
    rank, alpha = part.rank, part.alpha
    for i, layer in layers.items():
        if layer.slices is None:
            a, b = layer.lora_A.weight, layer.lora_B.weight
        else:  # q, v as one fused adapter of rank 2r with a block-diagonal B
            names = sorted(layer.slices, key=lambda k: layer.slices[k])
            a = torch.cat([layer.lora_A[k].weight for k in names])
            b = a.new_zeros(layer.base_layer.out_features, len(names) * layer.rank)
            for j, k in enumerate(names):
                lo, hi = layer.slices[k]
                b[lo:hi, j * layer.rank:(j + 1) * layer.rank] = layer.lora_B[k].weight
        key = f"{PREFIX}blocks.{i}.attn.qkv"
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
    if any(layer.slices for layer in layers.values()):
        rank, alpha = 2 * rank, 2 * alpha
    tensors[f"{PREFIX}head.weight"], tensors[f"{PREFIX}head.bias"] = model.head.weight, model.head.bias
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
              "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": ["qkv"],
              "modules_to_save": ["head"], "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
              "use_rslora": False, "use_dora": False}
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(tensors, out / WEIGHTS, {"format": "pt"})


def _read_weights(folder: Path) -> Dict[str, torch.Tensor]:
    if (folder / WEIGHTS).is_file():
        from safetensors.torch import load_file
        return load_file(str(folder / WEIGHTS))
    if (folder / "adapter_model.bin").is_file():
        return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointError(f"{folder} holds no {WEIGHTS} (nor adapter_model.bin)")


def check_peft_config(config: dict, folder) -> None:
    """Refuse, by name, what a gapt LoRA model does not compute (DoRA, rsLoRA, patterns, trained biases)."""
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{folder} is a peft {config.get('peft_type')!r} adapter; gapt reads LORA adapters")
    targets = config.get("target_modules")
    if targets not in (["qkv"], "qkv") and sorted(targets or []) != ["qkv"]:
        raise CheckpointError(f"{folder}: target_modules={targets!r}; gapt's LoRA sits on timm's fused attn.qkv "
                              f"(target_modules=['qkv'])")
    for key, ok in (("use_dora", False), ("use_rslora", False), ("bias", "none"), ("layers_to_transform", None)):
        if config.get(key, ok) != ok:
            raise CheckpointError(f"{folder}: {key}={config.get(key)!r} is not supported (gapt's LoRA: {key}={ok!r})")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise CheckpointError(f"{folder}: {key} is not supported (one rank and alpha for every layer)")


def load_peft(model, folder: str) -> None:
    """Load a peft LoRA adapter of this timm ViT into ``model`` (method=lora, lora_targets=qkv, same r and alpha)."""
    src = Path(folder)
    if not (src / CONFIG).is_file():
        raise CheckpointError(f"{folder} is not a peft adapter folder (no {CONFIG})")
    config = json.loads((src / CONFIG).read_text())
    check_peft_config(config, folder)
    layers = _lora_layers(model)
    part = model.part("lora")
    held = (int(config["r"]), float(config["lora_alpha"]), "qkv")
    if (part.rank, part.alpha, part.targets) != held:
        raise CheckpointError(f"{folder} holds LoRA r={held[0]}, lora_alpha={held[1]:g} on qkv; this model has "
                              f"lora_rank={part.rank}, lora_alpha={part.alpha:g}, lora_targets={part.targets}")
    weights = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in _read_weights(src).items()}
    own = {f"blocks.{i}.attn.qkv.lora_{ab}.weight": getattr(layer, f"lora_{ab}").weight
           for i, layer in layers.items() for ab in "AB"}
    if any(k.startswith("head.") for k in weights):
        own.update({"head.weight": model.head.weight, "head.bias": model.head.bias})
    from .tuned import copy_exactly
    copy_exactly(own, weights, str(folder), side="adapter")
