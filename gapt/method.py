"""A transfer method's settings, one dataclass (as peft keeps one config per tuner), and the rules by which
methods compose.

The run config's top-level method keys are these fields (``RunConfig`` extends this class),
``build_model`` / ``PromptedViT`` take one, and tuned files store one as metadata, so a
default or a list of choices is written here once. Pure Python: the CLI imports it without torch.

A method is one name or several joined by ``+`` (``gated+lora``: gated prompts on a LoRA-tuned
backbone). Each name stands for parts (``gapt.model.parts`` builds them); :func:`method_components`
checks a composition and says which two names cannot go together, before any work.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Tuple, Union

METHODS = ("linear", "full", "vpt-shallow", "vpt-deep", "vpt-at-block", "gated", "lora", "adaptformer", "bitfit",
           "ssf", "vfpt", "e2vpt", "da-vpt", "davpt-bias")
PROMPT_METHODS = ("vpt-shallow", "vpt-deep", "vpt-at-block", "gated", "vfpt", "e2vpt", "da-vpt")
# Prompt methods that insert fresh prompts before every block (nothing is carried from block to block).
DEEP_PROMPT_METHODS = ("vpt-deep", "vfpt", "e2vpt", "da-vpt")
# E2VPT's token / piece masks: trained as gates (the pre-pruning stage), fixed (the rewound runs), or absent.
E2VPT_MASKS = ("learned", "fixed", "none")
E2VPT_PIECES = 16                   # E2VPT's CLS_TOKEN_P_PIECES_NUM: strided pieces per prompt token
PEFT_METHODS = ("lora", "adaptformer", "bitfit", "ssf")
# Methods whose every part folds into the frozen weights (gapt.merge): a plain timm ViT + head.
MERGEABLE = ("linear", "full", "lora", "bitfit", "ssf", "davpt-bias")
POOLINGS = ("mean", "cls", "img", "prompt", "mean_normed", "mean_fc_norm")
PROMPT_INITS = ("random", "prototype", "spt", "vipamin")
# Settings read only by one prompt_init (a change without it is refused, naming both).
_INIT_OWNERS = {"spt_images": "spt", "vipamin_k": "vipamin", "vipamin_lambda": "vipamin"}
# The prompt placements a data-driven init fills (VPT's tokens; VFPT, E2VPT and DA-VPT transform or add their own).
INIT_PROMPT_METHODS = ("vpt-shallow", "vpt-deep", "vpt-at-block", "gated")
GATE_TYPES = ("soft", "hard")
LORA_TARGETS = ("qkv", "q,v")
_LORA_TARGET_ALIASES = {"qv": "q,v", "q+v": "q,v", "q, v": "q,v"}

# What each name is made of (gapt/model/parts builds one module per part).
COMPONENT_PARTS: Dict[str, Tuple[str, ...]] = {
    "linear": (), "full": ("full",), "vpt-shallow": ("prompts",), "vpt-deep": ("prompts",),
    "vpt-at-block": ("prompts",), "gated": ("prompts", "gates"), "lora": ("lora",), "adaptformer": ("adapter",),
    "bitfit": ("bias",), "ssf": ("ssf",), "vfpt": ("prompts",), "e2vpt": ("prompts", "kv_prompts"),
    "da-vpt": ("prompts",), "davpt-bias": ("davpt-bias",),
}
# Spellings of a whole method: DA-VPT+ is DA-VPT with the "+" biases (SPEC §12.5(c)).
METHOD_ALIASES = {"da-vpt+": "da-vpt+davpt-bias"}
# Pairs that cannot compose, and why (a name with itself: see method_components).
_BACKBONE_WEIGHTS = ("lora", "bitfit", "ssf", "davpt-bias")
_SETTING_OWNERS = {"lora_rank": "lora", "lora_alpha": "lora", "lora_targets": "lora", "adapter_dim": "adaptformer",
                   "adapter_scale": "adaptformer", "adapter_dropout": "adaptformer", "fourier_fraction": "vfpt",
                   "kv_prompts": "e2vpt", "e2vpt_masks": "e2vpt", "e2vpt_masked_tokens": "e2vpt",
                   "e2vpt_masked_pieces": "e2vpt"}
_SETTING_OWNERS.update({k: "da-vpt" for k in ("davpt_proxy_len", "davpt_proxy_first", "davpt_proxy_last",
                                              "davpt_prompt_norm", "davpt_init_div8", "davpt_patch_weight",
                                              "davpt_cls_weight", "davpt_cls_type", "davpt_scale", "davpt_mask",
                                              "davpt_drop_path", "davpt_samples_per_class", "davpt_dynamic_kmeans")})
_SETTING_OWNERS["davpt_bias_tensors"] = "davpt-bias"


class SettingError(ValueError):
    """A method setting that cannot work; ``key`` names the setting (the config key)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _conflict(a: str, b: str) -> str:
    """Why ``a`` and ``b`` cannot be parts of one method ('' when they can)."""
    if "linear" in (a, b):
        other = b if a == "linear" else a
        return f"'linear' trains only the head, so it does not combine with '{other}' (use method={other})"
    if "full" in (a, b) and (a if b == "full" else b) in _BACKBONE_WEIGHTS:
        other = b if a == "full" else a
        return f"'full' already trains every backbone weight, so '{other}' adds nothing to it"
    if "gated" in (a, b) and (a if b == "gated" else b) in DEEP_PROMPT_METHODS:
        other = b if a == "gated" else a
        return (f"'{other}' inserts fresh prompts before every block, so 'gated' has no prompts to carry from block "
                f"to block and its gates would mix outputs the next block overwrites (temperatures do combine: "
                f"method={other} learn_temperature=true)")
    if {a, b} == {"bitfit", "davpt-bias"}:
        return "'bitfit' already trains every bias, so 'davpt-bias' (a subset of them) adds nothing to it"
    if a in PROMPT_METHODS and b in PROMPT_METHODS:
        return (f"'{a}' and '{b}' both place the prompt tokens; choose one "
                f"(gated is VPT-shallow with gates; vpt-at-block with insert_at_block=1 is VPT-shallow)")
    return ""


def method_components(method: str) -> Tuple[str, ...]:
    """The names in ``method`` (``"gated+lora"`` -> ``("gated", "lora")``), in METHODS order.

    Raises ValueError for an unknown name, a name given twice, or two names that cannot compose
    (the message names both)."""
    method = METHOD_ALIASES.get(str(method).strip(), method)
    names = [n.strip() for n in str(method).split("+")]
    for n in names:
        if n not in METHODS:
            raise ValueError(f"unknown method '{n}'; valid: {list(METHODS)} (combine with '+', e.g. gated+lora)")
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if a == b:
                raise ValueError(f"method '{method}' names '{a}' twice")
            why = _conflict(a, b)
            if why:
                raise ValueError(f"method '{method}': {why}")
    return tuple(sorted(names, key=METHODS.index))


def canonical_method(method: str) -> str:
    """``"lora+gated"`` -> ``"gated+lora"``: one spelling per composition (tuned files, results, reports)."""
    return "+".join(method_components(method))


def canonical_lora_targets(targets: str) -> str:
    t = _LORA_TARGET_ALIASES.get(str(targets).strip(), str(targets).strip())
    if t not in LORA_TARGETS:
        raise SettingError("lora_targets", f"unknown lora_targets '{targets}'; valid: {list(LORA_TARGETS)} "
                                           f"('q,v' may also be written qv)")
    return t


@dataclass
class MethodSettings:
    method: str = "gated"           # one of METHODS, or several joined by '+' (gated+lora)
    num_prompts: int = 100
    gate_init: float = 10.0         # gate logits start at -gate_init (SPEC §2; the reference config's 10)
    gate_type: str = "soft"         # soft: g = sigmoid(gamma) | hard: 0/1 gates, Gumbel-Sigmoid straight-through (SPEC §9)
    gate_temperature: float = 1.0   # hard gates: the Gumbel-Sigmoid temperature t
    learn_temperature: bool = False
    insert_at_block: int = 1
    prompt_init: str = "random"     # random (VPT) | prototype (k-means, SPT paper) | spt (SPT code) | vipamin
    spt_images: int = 0             # spt: images drawn with replacement; 0 = SPT's: 1 (MoCo v3), else len(train)
    vipamin_k: int = 32             # vipamin: a prompt's matching part is the mean of its k best-matching patch tokens
    vipamin_lambda: float = 0.5     # vipamin: prompt = (1 - lambda) * matching + lambda * orthogonal part
    prompt_dropout: float = 0.1
    pooling: str = ""               # "" = the backbone's pretraining rule (mean | cls | img | prompt | mean_normed)
    lora_rank: int = 8              # lora: rank r of the update (alpha / r) B A, B zero at the start
    lora_alpha: float = 8.0         # lora: the update's scale is lora_alpha / lora_rank (peft's default 8 / 8)
    lora_targets: str = "qkv"       # lora: qkv (one A for q, k, v on timm's fused layer, as peft) | q,v (q and v only)
    adapter_dim: int = 64           # adaptformer: bottleneck width of the parallel MLP adapter
    adapter_scale: float = 0.1      # adaptformer: the adapter's output scale
    adapter_dropout: float = 0.1    # adaptformer: dropout inside the adapter (AdaptFormer's 0.1)
    fourier_fraction: float = 1.0   # vfpt: the first floor(num_prompts * fraction) prompts of each block go through the 2-D FFT (VFPT's alpha)
    kv_prompts: int = 5             # e2vpt: key-value prompts per block and head (E2VPT's NUM_TOKENS; num_prompts is NUM_TOKENS_P)
    e2vpt_masks: str = "learned"    # e2vpt: token / piece masks learned (trained as gates, before pruning) | fixed (set below, frozen: rewound runs) | none
    e2vpt_masked_tokens: List[int] = field(default_factory=list)  # e2vpt_masks=fixed: prompt tokens whose mask is 0
    e2vpt_masked_pieces: List[List[int]] = field(default_factory=list)  # e2vpt_masks=fixed: per prompt token, its masked pieces (0-15; piece j = dims j, j+16, ...)
    # da-vpt (SPEC §12.5; num_prompts = the other blocks' prompts, may be 0). Defaults: the released VTAB configs'
    davpt_proxy_len: int = 10       # da-vpt: proxy prompts per proxy block (proxy_prompt_len); num_classes if fewer
    davpt_proxy_first: int = 0      # da-vpt: first proxy block, 1-based (proxy_prompt_start_idx + 1); 0 = davpt_proxy_last
    davpt_proxy_last: int = 0       # da-vpt: last proxy block, 1-based (proxy_prompt_end_idx + 1); 0 = the last block
    davpt_prompt_norm: str = "none"  # da-vpt: none | l2 | layer, on every block's prompts (vpt_norm)
    davpt_init_div8: bool = True    # da-vpt: Xavier-uniform prompts divided by 8 (init_divide_by8)
    davpt_patch_weight: float = 0.01  # da-vpt: weight of the patch-mean metric loss (vpt_loss_weight)
    davpt_cls_weight: float = 0.01  # da-vpt: weight of the CLS metric loss (cls_loss_weight)
    davpt_cls_type: str = "query"   # da-vpt: CLS feature of that loss: query (W_q norm1 x_cls) | key | cls (cls_type)
    davpt_scale: float = 5.0        # da-vpt: tau, the cosine similarities' scale (loss_vpt_scale_ratio)
    davpt_mask: bool = False        # da-vpt: prompts attend to the patch tokens only (mask)
    davpt_drop_path: float = 0.0    # da-vpt: stochastic depth of the frozen blocks in training (drop_path)
    davpt_samples_per_class: int = 10  # da-vpt: images per class for the class-to-proxy k-means (init_sample_per_class)
    davpt_dynamic_kmeans: int = 0   # da-vpt: re-cluster after each epoch from this 0-based epoch on; 0 = never (dynamic_kmeans)
    davpt_bias_tensors: str = "v.bias,proj.bias,fc2.bias,norm2.bias"  # davpt-bias: the tensors DA-VPT+ trains (bias_*, norm_norm1, train_cls)

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

    def components(self) -> Tuple[str, ...]:
        return method_components(self.method)

    def check_parts(self) -> None:
        """The rules between settings and parts that need no backbone (ValueError naming the key):
        a part's own keys changed while the method lacks that part, and each part's value ranges."""
        parts = self.components()
        default = MethodSettings()
        self._check_prompt_init(parts, default)
        for key, owner in _SETTING_OWNERS.items():
            if owner not in parts and getattr(self, key) != getattr(default, key):
                kept = [p for p in parts if p != "linear" and not (owner in PROMPT_METHODS and p in PROMPT_METHODS)]
                raise SettingError(key, f"{key}={getattr(self, key)!r} needs the {owner} part: use "
                                        f"method={'+'.join((*kept, owner))}")
        if "lora" in parts:
            canonical_lora_targets(self.lora_targets)
            if int(self.lora_rank) < 1:
                raise SettingError("lora_rank", f"lora_rank must be >= 1, got {self.lora_rank}")
            if not float(self.lora_alpha) > 0:
                raise SettingError("lora_alpha", f"lora_alpha must be > 0, got {self.lora_alpha}")
        if "vfpt" in parts:
            self._check_vfpt()
        if "e2vpt" in parts:
            self._check_e2vpt()
        if "da-vpt" in parts or "davpt-bias" in parts:
            self._check_davpt(parts)
        if "adaptformer" in parts:
            if int(self.adapter_dim) < 1:
                raise SettingError("adapter_dim", f"adapter_dim must be >= 1, got {self.adapter_dim}")
            if not 0 <= float(self.adapter_dropout) < 1:
                raise SettingError("adapter_dropout", f"adapter_dropout must be in [0, 1), got {self.adapter_dropout}")

    def _check_vfpt(self) -> None:
        """VFPT (SPEC §12.3): Mf = floor(M * alpha) Fourier prompts per block, at least one (the official code
        fails on an FFT over no prompt; without Fourier prompts VFPT is vpt-deep)."""
        alpha = float(self.fourier_fraction)
        if not 0.0 < alpha <= 1.0:
            raise SettingError("fourier_fraction", f"fourier_fraction must be in (0, 1], got {self.fourier_fraction}")
        if int(int(self.num_prompts) * alpha) < 1:
            raise SettingError("fourier_fraction", f"fourier_fraction={self.fourier_fraction} of num_prompts="
                                                   f"{self.num_prompts} is no Fourier prompt (floor(M * alpha) = 0); "
                                                   f"raise it, or use method=vpt-deep for none")

    def _check_e2vpt(self) -> None:
        """E2VPT (SPEC §12.4): key-value prompt count, and the masks of the pruned (fixed) stage."""
        if int(self.kv_prompts) < 1:
            raise SettingError("kv_prompts", f"kv_prompts must be >= 1, got {self.kv_prompts}")
        if self.e2vpt_masks not in E2VPT_MASKS:
            raise SettingError("e2vpt_masks", f"unknown e2vpt_masks '{self.e2vpt_masks}'; valid: {list(E2VPT_MASKS)}")
        tokens, pieces, m = list(self.e2vpt_masked_tokens), list(self.e2vpt_masked_pieces), int(self.num_prompts)
        if self.e2vpt_masks != "fixed":
            for key, value in (("e2vpt_masked_tokens", tokens), ("e2vpt_masked_pieces", pieces)):
                if value:
                    raise SettingError(key, f"{key} needs e2vpt_masks=fixed (got e2vpt_masks={self.e2vpt_masks})")
            return
        if any(not 0 <= int(t) < m for t in tokens) or len(set(tokens)) != len(tokens):
            raise SettingError("e2vpt_masked_tokens", f"e2vpt_masked_tokens must be distinct prompt indices in "
                                                      f"0..{m - 1}, got {tokens}")
        if pieces and len(pieces) != m:
            raise SettingError("e2vpt_masked_pieces", f"e2vpt_masked_pieces needs one list per prompt token "
                                                      f"({m}), got {len(pieces)}")
        for j, row in enumerate(pieces):
            if any(not 0 <= int(q) < E2VPT_PIECES for q in row) or len(set(row)) != len(row):
                raise SettingError("e2vpt_masked_pieces", f"e2vpt_masked_pieces[{j}] must hold distinct pieces in "
                                                          f"0..{E2VPT_PIECES - 1}, got {row}")

    def _check_davpt(self, parts: Tuple[str, ...]) -> None:
        """DA-VPT's ranges (SPEC §12.5) and the "+" tensors (gapt/model/parts/davpt_bias.py lists them)."""
        if "davpt-bias" in parts:
            allowed = ("v.bias", "proj.bias", "fc2.bias", "norm2.bias", "q.bias", "k.bias", "fc1.bias", "norm1.bias",
                       "norm1", "norm2", "cls_token")
            names = [t.strip() for t in str(self.davpt_bias_tensors).split(",") if t.strip()]
            if not names or any(t not in allowed for t in names):
                raise SettingError("davpt_bias_tensors", f"davpt_bias_tensors={self.davpt_bias_tensors!r}: a comma "
                                                         f"list of {list(allowed)}")
        if "da-vpt" not in parts:
            return
        if self.prompt_init != "random":
            raise SettingError("prompt_init", f"prompt_init={self.prompt_init} does not apply to da-vpt: its prompts "
                                              f"start Xavier-uniform and its own init pass maps classes to proxies")
        checks = (("num_prompts", int(self.num_prompts) >= 0, ">= 0 (the other blocks' prompts)"),
                  ("davpt_proxy_len", int(self.davpt_proxy_len) >= 1, ">= 1"),
                  ("davpt_proxy_first", int(self.davpt_proxy_first) >= 0, ">= 0 (0: davpt_proxy_last)"),
                  ("davpt_proxy_last", int(self.davpt_proxy_last) >= 0, ">= 0 (0: the last block)"),
                  ("davpt_prompt_norm", self.davpt_prompt_norm in ("none", "l2", "layer"), "none | l2 | layer"),
                  ("davpt_cls_type", self.davpt_cls_type in ("query", "key", "cls"), "query | key | cls"),
                  ("davpt_patch_weight", float(self.davpt_patch_weight) >= 0, ">= 0"),
                  ("davpt_cls_weight", float(self.davpt_cls_weight) >= 0, ">= 0"),
                  ("davpt_scale", float(self.davpt_scale) >= 0, ">= 0"),
                  ("davpt_drop_path", 0 <= float(self.davpt_drop_path) < 1, "in [0, 1)"),
                  ("davpt_samples_per_class", int(self.davpt_samples_per_class) >= 1, ">= 1"),
                  ("davpt_dynamic_kmeans", int(self.davpt_dynamic_kmeans) >= 0, ">= 0 (0: never)"))
        for key, ok, want in checks:
            if not ok:
                raise SettingError(key, f"{key} must be {want}, got {getattr(self, key)!r}")
        first, last = int(self.davpt_proxy_first), int(self.davpt_proxy_last)
        if first and last and first > last:
            raise SettingError("davpt_proxy_first", f"davpt_proxy_first={first} is after davpt_proxy_last={last}")

    def _check_prompt_init(self, parts: Tuple[str, ...], default: "MethodSettings") -> None:
        """A data-driven prompt init needs prompts; its own keys need it (SPT / VIPAMIN, SPEC §12.1-12.2)."""
        if self.prompt_init != "random" and not any(p in INIT_PROMPT_METHODS for p in parts):
            raise SettingError("prompt_init", f"prompt_init={self.prompt_init} fills VPT's prompt tokens: use it with "
                                              f"{', '.join(INIT_PROMPT_METHODS)} (method '{self.method}')")
        for key, owner in _INIT_OWNERS.items():
            if self.prompt_init != owner and getattr(self, key) != getattr(default, key):
                raise SettingError(key, f"{key}={getattr(self, key)!r} needs prompt_init={owner} "
                                        f"(got prompt_init={self.prompt_init})")
        if int(self.spt_images) < 0:
            raise SettingError("spt_images", f"spt_images must be >= 0 (0: SPT's default), got {self.spt_images}")
        if int(self.vipamin_k) < 1:
            raise SettingError("vipamin_k", f"vipamin_k must be >= 1, got {self.vipamin_k}")
        if not 0.0 <= float(self.vipamin_lambda) <= 1.0:
            raise SettingError("vipamin_lambda", f"vipamin_lambda must be in [0, 1], got {self.vipamin_lambda}")
