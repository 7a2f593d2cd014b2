"""A transfer method as a list of parts (DESIGN.md, "The method layer as parts"); peft's ``tuners/`` is the model.

Each module here is one part: its settings, the tensors it trains, where it attaches to a timm
block, and whether it folds into the frozen weights (``base.py`` states the contract):

    prompts.py      prompt tokens: VPT shallow, deep, at block k              tokens hook
    gates.py        GaPT's soft / hard gates on the prompt slice                mix hook
    temperature.py  AAS: one attention temperature per block                    block hook
    lora.py         LoRA on the fused qkv (peft's layout) or on q and v         wraps attn.qkv; folds
    ssf.py          SSF scale and shift after 8 places                          wraps 8 modules; folds
    adapter.py      AdaptFormer's parallel MLP adapter                          block hook
    tuning.py       full fine-tuning, BitFit (the backbone's own tensors)       folds trivially
    fourier.py      VFPT: deep prompts, the first of each block through a 2-D FFT   tokens hook (prompts' transform)
    kv_prompts.py   E2VPT: masked deep prompts + key-value prompts per block     tokens hook + block hook (extra k/v)
    davpt.py        DA-VPT: fresh proxy / other prompts per block + metric loss   tokens hook (+ loss terms, mask)
    davpt_bias.py   DA-VPT+'s "+": v / proj / fc2 / norm2 biases (a subset)       wraps attn.qkv; folds

``build_parts`` turns a :class:`gapt.method.MethodSettings` (``method="gated+lora"``, ...) into parts in
attach order; the composition rules live in gapt/method.py, so the config can refuse a method
before torch is imported.
"""
from __future__ import annotations

from typing import List

from ...method import PROMPT_METHODS, MethodSettings
from .adapter import AdaptFormer
from .base import BlockCall, NotMergeable, Part, Step, Wrapper, fold, strip
from .gates import Gates
from .lora import LoRA, LoraLinear
from .prompts import PromptTokens, prompt_init_bound
from .fourier import FourierPrompts
from .kv_prompts import KVPrompts, MaskedPrompts
from .ssf import SSF, ScaleShift
from .davpt import DAVPT
from .davpt_bias import DAVPTBias
from .temperature import TEMPERATURE_RANGE, Temperature
from .tuning import BiasTuning, FullTuning

__all__ = ["build_parts", "Part", "BlockCall", "Step", "NotMergeable", "Wrapper", "fold", "strip",
           "PromptTokens", "Gates", "Temperature", "LoRA", "LoraLinear", "SSF", "ScaleShift", "AdaptFormer",
           "BiasTuning", "FullTuning", "prompt_init_bound", "TEMPERATURE_RANGE", "FourierPrompts", "MaskedPrompts",
           "KVPrompts", "DAVPT", "DAVPTBias"]
# Prompt placements with a part class of their own (the rest are PromptTokens).
PROMPT_PARTS = {"vfpt": FourierPrompts, "e2vpt": MaskedPrompts, "da-vpt": DAVPT}


def build_parts(settings: MethodSettings) -> List[Part]:
    """The parts of ``settings.method`` in attach order: the backbone's own tensors, then wrappers (inner
    before outer: LoRA inside SSF on qkv), modules beside the blocks, prompt tokens and what acts on them."""
    names = settings.components()
    parts: List[Part] = []
    if "full" in names:
        parts.append(FullTuning(settings))
    if "bitfit" in names:
        parts.append(BiasTuning(settings))
    if "lora" in names:
        parts.append(LoRA(settings))
    if "ssf" in names:
        parts.append(SSF(settings))
    if "davpt-bias" in names:
        parts.append(DAVPTBias(settings))
    if "adaptformer" in names:
        parts.append(AdaptFormer(settings))
    prompted = [n for n in names if n in PROMPT_METHODS]
    if prompted:
        parts.append(PROMPT_PARTS.get(prompted[0], PromptTokens)(settings, prompted[0]))
    if "e2vpt" in names:
        parts.append(KVPrompts(settings))
    if "gated" in names:
        parts.append(Gates(settings))
    if settings.learn_temperature:
        parts.append(Temperature(settings))
    return parts
