"""Tuned-state files: only what was trained (prompts, gates, temperatures, LoRA, adapters, SSF, biases, head),
as safetensors, under the model's parameter names (``prompt_embeddings``, ``backbone.blocks.0.attn.qkv.lora_A.weight``).

Also reads models saved by the reference GaPT/VPT trainer (SPEC §4): ``{"model": state_dict}``
with ``enc.prompt_embeddings``, ``enc.deep_prompt_embeddings``, ``enc.gate_logit``, ``enc.temp``,
``head.last_layer.*`` and the frozen encoder under ``enc.<timm names>``; and those of the VPT-codebase forks:
VFPT's (VPT-deep's tensors, loaded into ``method=vfpt``) and E2VPT's (``enc.blocks.<l>.attn.deep_QKV_embeddings``,
``enc.prompt_soft_tokens[_pieces]_mask_cls_token``; an MAE encoder saved with ``fc_norm`` instead of ``norm``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .checkpoints import CheckpointError, load_into_vit, read_tensor_file

log = logging.getLogger("gapt")

FORMAT = "gapt-tuned"
# gapt.seg's tuned files: the prompted encoder's tensors under "encoder.", plus the heads.
SEG_FORMAT = "gapt-seg-tuned"
# Hyper-parameters that must agree between a file and the model it is loaded into.
IDENTITY_KEYS = ("backbone", "method", "num_prompts", "learn_temperature", "insert_at_block", "num_classes",
                 "gate_type", "lora_rank", "lora_alpha", "lora_targets", "adapter_dim", "adapter_scale",
                 "fourier_fraction", "kv_prompts", "e2vpt_masks", "e2vpt_masked_tokens", "e2vpt_masked_pieces")
# Keys that matter only with a part of the method (a gated file's lora_rank is the unused default).
PART_KEYS = {"lora_rank": "lora", "lora_alpha": "lora", "lora_targets": "lora", "adapter_dim": "adaptformer",
             "adapter_scale": "adaptformer", "fourier_fraction": "vfpt", "kv_prompts": "e2vpt", "e2vpt_masks": "e2vpt",
             "e2vpt_masked_tokens": "e2vpt", "e2vpt_masked_pieces": "e2vpt"}
REFERENCE_KEYS = {
    "enc.prompt_embeddings": "prompt_embeddings",
    "enc.deep_prompt_embeddings": "deep_prompt_embeddings",
    "enc.gate_logit": "gate_logits",
    "enc.temp": "temperature",
    "head.last_layer.weight": "head.weight",
    "head.last_layer.bias": "head.bias",
    "enc.prompt_soft_tokens_mask_cls_token": "prompt_soft_tokens_mask_cls_token",  # E2VPT's token / piece masks
    "enc.prompt_soft_tokens_pieces_mask_cls_token": "prompt_soft_tokens_pieces_mask_cls_token",
}
# E2VPT's key-value prompts, enc.blocks.<l>.attn.deep_QKV_embeddings: gapt's backbone.blocks.<l>.attn.<same>.
KV_SUFFIX = ".attn.deep_QKV_embeddings"
# Parameter-free or head-only leftovers in a reference encoder that gapt does not use.
REFERENCE_IGNORED_ENC = ("head.", "fc_norm.", "pre_logits.")


def model_identity(model) -> Dict:
    """The tuned file's metadata: the backbone, the method's settings (gapt.method) and the shapes."""
    return {"backbone": model.backbone_name, **model.settings.as_dict(), "num_classes": model.num_classes,
            "image_size": model.image_size, "depth": model.depth, "embed_dim": model.embed_dim,
            "class_names": model.class_names}


def write_safetensors(tensors: Dict[str, torch.Tensor], path, metadata: Dict[str, str]) -> None:
    """Atomic (an interrupted save never leaves half a file), with the permissions of any new file
    (safetensors' own ``save_file`` makes files 0600, which others in a group could not load)."""
    from safetensors.torch import save
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(save(tensors, metadata=metadata))  # tuned files are small: kilobytes to megabytes
    tmp.replace(path)


def save_tuned(model, path: str, extra: Optional[dict] = None) -> None:
    from .. import __version__
    tensors = {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in model.tuned_parameters().items()}
    meta = {"format": FORMAT, "gapt_version": __version__, "config": json.dumps(model_identity(model))}
    if extra:
        meta["extra"] = json.dumps(extra)
    write_safetensors(tensors, path, meta)


def read_safetensors_metadata(path, kind: str = "tuned file") -> Dict[str, str]:
    """A safetensors file's metadata, with a named error for a missing or unreadable file."""
    from safetensors import safe_open
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{kind} not found: {path}")
    try:
        with safe_open(str(p), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f"{path} is not a safetensors file: {str(e).splitlines()[0]}") from None


def _classification_config(path: str, meta: Dict[str, str]) -> Dict:
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not a gapt tuned file "
                              f"(metadata format={meta.get('format')!r}); a backbone checkpoint goes to weights=")
    out = json.loads(meta["config"])
    out["extra"] = json.loads(meta["extra"]) if "extra" in meta else {}
    return out


def read_tuned_metadata(path: str) -> Dict:
    """The hyper-parameters stored in a gapt tuned file (raises if it is not one)."""
    return _classification_config(path, read_safetensors_metadata(path))


def read_encoder_tuned(path: str) -> Tuple[Dict, Dict[str, torch.Tensor]]:
    """(hyper-parameters, the prompted encoder's tuned tensors) of a classification or a
    segmentation tuned file: what analyses of prompts, gates and temperatures read."""
    from safetensors.torch import load_file
    meta = read_safetensors_metadata(path)
    p = Path(path)
    if meta.get("format") != SEG_FORMAT:
        return _classification_config(path, meta), load_file(str(p))
    if "config" not in meta:
        raise CheckpointError(f"{path} is a gapt segmentation tuned file without its config metadata")
    tensors = load_file(str(p))
    return json.loads(meta["config"]), {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}


def _keys(d: Dict):
    names = str(d.get("method", "")).split("+")
    return [k for k in IDENTITY_KEYS if k in d and (k not in PART_KEYS or PART_KEYS[k] in names)]


def _describe(d: Dict) -> str:
    return ", ".join(f"{k}={d.get(k)!r}" for k in _keys(d))


def _check_identity(model, held: Dict, path: str) -> None:
    expected = model_identity(model)
    wrong = [k for k in _keys(held) if held[k] != expected[k]]
    if wrong:
        raise CheckpointError(f"{path} holds a tuned model with {_describe(held)}; this model expects "
                              f"{_describe(expected)} (differs in: {', '.join(wrong)})")


def _load_tensors(model, tensors: Dict[str, torch.Tensor], path: str) -> None:
    copy_exactly(model.tuned_parameters(), tensors, path)


def copy_exactly(own: Dict[str, torch.Tensor], tensors: Dict[str, torch.Tensor], source: str,
                 side: str = "file") -> None:
    """Copy ``tensors`` into the parameters ``own`` when the names and shapes are exactly the same; else a
    CheckpointError naming ``source`` and every missing, unexpected and mis-shaped name."""
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    shapes = [f"{k}: {side} {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(tensors)) if tensors[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{source} does not fit this model: missing {missing}, unexpected {unexpected}, "
                              f"mis-shaped {shapes}")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(tensors[k].to(p.dtype))


def load_tuned(model, path: str) -> None:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        held = read_tuned_metadata(path)
        _check_identity(model, held, path)
        _load_tensors(model, load_file(str(path)), path)
        if held.get("class_names"):
            model.class_names = list(held["class_names"])
        return
    raw = read_tensor_file(path)
    sd = raw.get("model", raw)
    if not any(k in sd for k in REFERENCE_KEYS) and not any(str(k).startswith("enc.") for k in sd):
        raise CheckpointError(f"{path} is neither a gapt tuned file (.safetensors) nor a model saved by the "
                              f"reference GaPT/VPT trainer ({{'model': {{'enc.*', 'head.last_layer.*'}}}})")
    load_reference_tuned(model, sd, path)


def infer_reference_identity(sd: Dict[str, torch.Tensor]) -> Dict:
    """What a reference-trainer state dict holds: method, prompt count, temperature, classes."""
    kv = sorted(k for k in sd if str(k).startswith("enc.") and str(k).endswith(KV_SUFFIX))
    if kv:
        method = "e2vpt"
    elif "enc.deep_prompt_embeddings" in sd:  # VPT-deep, or VFPT (same tensors): load_reference_tuned decides
        method = "vpt-deep"
    elif "enc.gate_logit" in sd:
        method = "gated"
    elif "enc.prompt_embeddings" in sd:
        method = "vpt-shallow"
    else:
        method = "linear"
    held = {"method": method, "learn_temperature": "enc.temp" in sd}
    if "enc.prompt_embeddings" in sd:
        held["num_prompts"] = int(sd["enc.prompt_embeddings"].shape[1])
    else:
        held["num_prompts"] = 0
    if "head.last_layer.weight" in sd:
        held["num_classes"] = int(sd["head.last_layer.weight"].shape[0])
    if kv:
        held["kv_prompts"] = int(sd[kv[0]].shape[1])
    return held


def _reference_masks(model, sd: Dict[str, torch.Tensor], path: str) -> Dict[str, torch.Tensor]:
    """E2VPT's masks: trained tensors (e2vpt_masks=learned); a rewound model's frozen masks must equal the
    model's fixed ones and are then dropped; a model without masks refuses a file with masks."""
    names = [k for k in REFERENCE_KEYS if k.startswith("enc.prompt_soft_tokens")]
    held, masks = [k for k in names if k in sd], model.settings.e2vpt_masks
    if masks == "none" and held:
        raise CheckpointError(f"{path} holds E2VPT's token / piece masks; build the model with e2vpt_masks=learned "
                              f"(or fixed, with the masked entries)")
    if masks == "fixed":
        wrong = [k for k in held if not torch.equal(sd[k].float(), getattr(model, REFERENCE_KEYS[k]).detach().cpu())]
        if wrong:
            raise CheckpointError(f"{path}: {', '.join(wrong)} differ from this model's fixed masks "
                                  f"(e2vpt_masked_tokens / e2vpt_masked_pieces)")
        sd = {k: v for k, v in sd.items() if k not in names}
    return sd


def load_reference_tuned(model, sd: Dict[str, torch.Tensor], path: str) -> None:
    held = infer_reference_identity(sd)
    if held["method"] == "vpt-deep" and held["learn_temperature"] and not model.learn_temperature:
        held["learn_temperature"] = False  # the reference ignores temperatures with vpt-deep
        sd = {k: v for k, v in sd.items() if k != "enc.temp"}
    if held["method"] == "vpt-deep" and model.method == "vfpt":  # VFPT's files hold VPT-deep's tensors
        held["method"] = "vfpt"
    _check_identity(model, held, path)
    if held["method"] == "e2vpt":
        sd = _reference_masks(model, sd, path)
    tuned = {new: sd[old] for old, new in REFERENCE_KEYS.items() if old in sd}
    tuned.update({"backbone." + k[4:]: v for k, v in sd.items() if k.startswith("enc.") and k.endswith(KV_SUFFIX)})
    _load_tensors(model, tuned, path)
    encoder = {k[4:]: v for k, v in sd.items()
               if k.startswith("enc.") and k not in REFERENCE_KEYS and not k[4:].startswith(REFERENCE_IGNORED_ENC)}
    if any(not k.endswith(KV_SUFFIX) for k in encoder):  # the reference saved the frozen encoder too: use it
        if "norm.weight" not in encoder and "enc.fc_norm.weight" in sd:  # VPT-codebase MAE: fc_norm replaced norm
            encoder.update({k: v for k, v in model.backbone.state_dict().items() if k.startswith("norm.")})
        load_into_vit(model.backbone, encoder, path)
        log.info("loaded the reference trainer's model from %s (%s, encoder weights included)", path, held["method"])
