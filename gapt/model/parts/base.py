"""The contract every part of a method keeps, and the wrapper that weight parts put around a frozen module.

A part is one piece of a transfer method (prompts, gates, temperatures, LoRA, an adapter, SSF,
bias tuning, full tuning). It reads its settings, creates the tensors it trains (at the names the
authors' code uses), hooks into the forward at a few named points, and says whether it folds
into the frozen weights. ``PromptedViT.run_blocks`` is the one loop that calls the hooks:

    begin(model, step)                   once per forward pass (hard gates draw their noise here)
    tokens(model, i, x, step) -> x       before block i: insert / replace / transform the prompt slice
    block(model, i, call, step)          inside block i: set fields of ``call`` (a BlockCall):
                                         temperature, extra keys/values, a branch beside the MLP
    mix(model, i, out, x_in, step) -> out  after block i (GaPT's gate)
    loss terms                           append tensors to ``step.losses``; the trainer adds them
                                         (``step.targets``: the batch's labels in training, else None)
    epoch_begin / epoch_end, state / load_state   around each training epoch; kept in the resume file

Weight parts hook nowhere in the loop: they wrap a frozen nn.Linear / LayerNorm / Conv2d (peft's
``base_layer`` pattern, :class:`Wrapper`), so timm's own block forward still runs. Data-driven
initialisations (prototypes, and later SPT / VIPAMIN) read ``PromptedViT.prompt_insertions()``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn

from ...method import MethodSettings


class NotMergeable(ValueError):
    """A part that cannot fold into the frozen weights (prompts, adapters): the message says why in one line."""


@dataclass
class BlockCall:
    """What parts change inside one block (all None: timm's own block forward runs)."""
    temperature: Optional[torch.Tensor] = None   # AAS: softmax(Q K^T d^-1/2 / tau)
    rope: Optional[torch.Tensor] = None          # Eva: the patch tokens' rotary embedding
    # extra keys/values (E2VPT-style): (k, v) of shape (B, heads, N, d) -> (k', v') with extra rows
    extra_kv: Optional[Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]] = None
    mlp_parallel: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # AdaptFormer: f(x) beside the MLP
    probs: Optional[list] = None                 # a sink for the attention probabilities (analysis)
    attn_mask: Optional[torch.Tensor] = None     # (N, N) bool, True = may attend (DA-VPT's prompt mask)

    def runs_timm_block(self) -> bool:
        return self.temperature is None and self.extra_kv is None and self.mlp_parallel is None \
            and self.probs is None and self.attn_mask is None


@dataclass
class Step:
    """What one forward pass shares between parts."""
    prefix: int                                  # CLS + register tokens of the backbone
    rope: Optional[torch.Tensor] = None
    gates: Optional[torch.Tensor] = None         # drawn once per pass (hard gates: one noise draw)
    losses: List[torch.Tensor] = field(default_factory=list)
    targets: Optional[torch.Tensor] = None       # the batch's labels in training (model.targets), for loss terms


class Part:
    """One piece of a method; see the module docstring for the hooks. Subclasses override what they use."""
    name = ""           # the method component it implements (for messages)
    kind = ""           # what it is (prompts, gates, lora, ...): the key of its tuned-parameter count
    hooks: Tuple[str, ...] = ()   # which of begin / tokens / block / mix it implements

    def __init__(self, settings: MethodSettings):
        self.settings = settings

    # -- build -------------------------------------------------------------------------------
    def attach(self, model) -> None:
        """Create the trained tensors on ``model`` (or inside its backbone); called once."""

    def frozen_blocks(self, model) -> int:
        """How many leading blocks this part leaves untouched (the frozen-block caches use the minimum)."""
        return 0

    def owns(self, name: str) -> bool:
        """Whether the trained tensor ``name`` (a model parameter name) belongs to this part."""
        return False

    def no_decay(self, name: str, p: torch.Tensor) -> bool:
        """Tensors the official recipe keeps out of weight decay (timm's optimizers: 1-D tensors)."""
        return False

    def train_modules(self, model) -> List[nn.Module]:
        """Modules this part placed inside the (always eval-mode) backbone that follow the model's mode."""
        return []

    def not_mergeable(self) -> str:
        """'' when the part folds into the frozen weights (``gapt.merge``), else one line saying why not."""
        return f"{self.name} cannot fold into the frozen weights"

    # -- forward hooks -------------------------------------------------------------------------
    def begin(self, model, step: Step) -> None:
        pass

    def tokens(self, model, i: int, x: torch.Tensor, step: Step) -> torch.Tensor:
        return x

    def block(self, model, i: int, call: BlockCall, step: Step) -> None:
        pass

    def mix(self, model, i: int, out: torch.Tensor, x_in: torch.Tensor, step: Step) -> torch.Tensor:
        return out

    # -- training epochs and resume state (DA-VPT re-clusters its class -> proxy mapping) -------------
    def epoch_begin(self, model, epoch: int) -> None:
        """Before training epoch ``epoch`` (0-based)."""

    def epoch_end(self, model, epoch: int) -> None:
        """After training epoch ``epoch``, before its evaluation."""

    def state(self, model) -> Optional[dict]:
        """What a resumed run needs besides the trained tensors (None: nothing)."""
        return None

    def load_state(self, model, state: dict) -> None:
        pass


# -- weight parts: wrappers around frozen modules -------------------------------------------------
class Wrapper(nn.Module):
    """A frozen module plus something trained (peft's ``base_layer`` layout): ``base_layer`` runs as before.

    ``folded()`` returns a plain module computing the same function (the frozen weights changed);
    wrappers nest (SSF around LoRA around the Linear), the inner one folds first."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer

    def folded(self) -> nn.Module:
        raise NotImplementedError

    def base(self) -> nn.Module:
        """The innermost frozen module, with nothing folded in."""
        inner = self.base_layer
        return inner.base() if isinstance(inner, Wrapper) else inner


def fold(module: nn.Module) -> nn.Module:
    """``module`` with every wrapper in it folded into plain modules (in place; copy first to keep the original)."""
    if isinstance(module, Wrapper):
        return module.folded()
    for name, child in list(module.named_children()):
        new = fold(child)
        if new is not child:
            setattr(module, name, new)
    return module


def strip(module: nn.Module) -> nn.Module:
    """``module`` with every wrapper replaced by the frozen module inside it (in place): the part-free backbone."""
    if isinstance(module, Wrapper):
        return strip(module.base())
    for name, child in list(module.named_children()):
        new = strip(child)
        if new is not child:
            setattr(module, name, new)
    return module


def wrap(parent: nn.Module, name: str, make: Callable[[nn.Module], Wrapper]) -> Wrapper:
    """Replace ``parent.<name>`` by ``make(parent.<name>)`` and return the wrapper."""
    wrapper = make(getattr(parent, name))
    setattr(parent, name, wrapper)
    return wrapper


def check_timm_vit(vit: nn.Module, part: str) -> None:
    """Weight parts wrap timm VisionTransformer modules by name; Eva's attention reads ``qkv.weight`` directly."""
    if type(vit).__name__ == "Eva":
        raise ValueError(f"method part '{part}' wraps timm VisionTransformer layers; Eva backbones (DINOv3) are "
                         f"not supported by it yet (bitfit, adaptformer and the prompt methods are)")
