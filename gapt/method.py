"""A transfer method's settings, one dataclass (as peft keeps one config per tuner).

The run config's top-level method keys are these fields (``RunConfig`` extends this class),
``build_model`` / ``PromptedViT`` take one, and tuned files store one as metadata, so a
default or a list of choices is written here once. Pure Python: the CLI imports it without torch.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Mapping, Union

METHODS = ("linear", "full", "vpt-shallow", "vpt-deep", "vpt-at-block", "gated")
PROMPT_METHODS = ("vpt-shallow", "vpt-deep", "vpt-at-block", "gated")
POOLINGS = ("mean", "cls", "img", "prompt", "mean_normed")
PROMPT_INITS = ("random", "prototype")
GATE_TYPES = ("soft", "hard")


@dataclass
class MethodSettings:
    method: str = "gated"
    num_prompts: int = 100
    gate_init: float = 10.0         # gate logits start at -gate_init (SPEC §2; the reference config's 10)
    gate_type: str = "soft"         # soft: g = sigmoid(gamma) | hard: 0/1 gates, Gumbel-Sigmoid straight-through (SPEC §9)
    gate_temperature: float = 1.0   # hard gates: the Gumbel-Sigmoid temperature t
    learn_temperature: bool = False
    insert_at_block: int = 1
    prompt_init: str = "random"     # random | prototype
    prompt_dropout: float = 0.1
    pooling: str = ""               # "" = the backbone's pretraining rule (mean | cls | img | prompt | mean_normed)

    @classmethod
    def names(cls):
        return [f.name for f in fields(MethodSettings)]

    @classmethod
    def of(cls, source: Union["MethodSettings", Mapping[str, Any], Any] = None, **changes) -> "MethodSettings":
        """The settings held by ``source`` (a RunConfig, a tuned file's metadata dict, settings, or a
        method name), with ``changes``; keys ``source`` lacks take the defaults (older tuned files)."""
        if source is None:
            held: Dict[str, Any] = {}
        elif isinstance(source, str):
            held = {"method": source}
        elif isinstance(source, Mapping):
            held = {k: source[k] for k in cls.names() if k in source}
        else:
            held = {k: getattr(source, k) for k in cls.names() if hasattr(source, k)}
        return MethodSettings(**{**held, **changes})

    def as_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.names()}
