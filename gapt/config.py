"""Typed run configuration: YAML file + dotted ``key=value`` overrides, validated before any work.

The dataclasses below are the single source of truth for config keys; OmegaConf merges a
YAML file and command-line overrides into them and rejects unknown keys and wrong types.
"""
from __future__ import annotations

import difflib
import dataclasses
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, List, Optional, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .method import (GATE_TYPES, METHODS, POOLINGS, PROMPT_INITS, PROMPT_METHODS, MethodSettings, SettingError,
                     canonical_lora_targets, method_components)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key or value."""


@dataclass
class DataConfig:
    format: str = "folder"          # fgvc | vtab | folder | csv | shapes; segmentation: ade20k | seg_folder
    root: str = ""                  # dataset folder (fgvc/vtab: the dataset's own folder or its parent)
    name: str = ""                  # FGVC dataset or VTAB task name (sets classes and image root)
    train_split: str = ""           # "" = the format's default (e.g. train / train800)
    val_split: str = ""
    test_split: str = ""
    final: bool = False             # final run: train on the format's final split (fgvc: train, vtab: train800val200)
    val_fraction: float = 0.1       # folder/csv without a val split: stratified, seeded carve-out
    csv_train: str = ""             # csv: path,label files (relative to root)
    csv_val: str = ""
    csv_test: str = ""
    cache: str = "memory"           # un-augmented splits: memory | disk | none
    cache_augmented: bool = False   # also cache augmented train splits (resized, before the random crop)
    cache_dir: str = ""             # disk cache location ("" = <root>/.gapt_cache)
    vtab_resize: str = "tf_bilinear"  # tf_bilinear (reference, no antialias) | antialias
    skip_bad_images: bool = False
    num_workers: int = 2
    num_samples: int = 0            # generated datasets (shapes): images per split; 0 = default
    num_classes: int = 0            # 0 = from the labels; N: classes 0..N-1, a label outside is an error


@dataclass
class TrainConfig:
    epochs: int = 100
    warmup_epochs: Union[int, str] = "auto"  # auto = round(epochs / 10), half up: 10 at the paper's 100
    batch_size: int = 64
    eval_batch_size: int = 0        # 0 = 2 x batch_size
    lr: float = 0.1
    weight_decay: float = 0.0
    optimizer: str = "sgd"          # sgd | adamw
    momentum: float = 0.9
    schedule: str = "cosine"        # cosine (per iteration) | cosine_epoch (the reference's per-epoch steps)
    seed: int = 42
    precision: str = "auto"         # auto (bf16 on GPU, fp32 on CPU) | fp32 (strict: TF32 off) | bf16
    compile: bool = False
    grad_checkpointing: bool = False
    max_steps_per_epoch: int = 0    # 0 = whole epoch; >0 caps an epoch (smoke runs)
    eval_test_every_epoch: bool = False  # the reference protocol (costly); off by default
    logger: str = "auto"              # auto (tensorboard if installed, else none) | tensorboard | wandb | none
    clip_grad_value: float = 0.0    # > 0: clamp every gradient element to [-v, v] before the step (DA-VPT: 10)
    head_weight_decay: float = -1.0  # the head's weight decay; < 0 = train.weight_decay (DA-VPT's wd_head)
    head_bias_decay: bool = True    # false: no weight decay on the head's bias (timm's 1-D rule, DA-VPT)


@dataclass
class SegConfig:
    """Segmentation only (gapt seg train): iteration-based with poly decay."""
    iterations: int = 0             # > 0: train this many iterations (segmentation)
    eval_every: int = 0             # segmentation: evaluate val every N iterations (0 = at the end only)
    head_lr_mult: float = 10.0      # segmentation heads' lr multiplier (SETR recipe)
    poly_power: float = 0.9
    min_lr: float = 1e-4
    crop_size: int = 512            # segmentation: training crop and sliding window
    sincos_pos_embed: str = "interpolate"  # MoCo v3's sin-cos table at the crop: interpolate (MMSegmentation) | rebuild


@dataclass
class RunConfig(MethodSettings):
    """The method's keys (method, num_prompts, gate_init, ...: gapt.method.MethodSettings) and the run's."""
    backbone: str = "mae_vitb16"
    weights: Optional[str] = None   # checkpoint path, "timm" (hub), or null (random backbone)
    image_size: int = 224
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seg: SegConfig = field(default_factory=SegConfig)
    out: str = "runs/default"
    device: str = "auto"            # auto | cpu | cuda | cuda:N


# Allowed values for string keys that take one of a fixed set; checked in validate().
CHOICES = {
    "method": list(METHODS),        # each name of a '+' composition (validate checks the composition)
    "prompt_init": list(PROMPT_INITS),
    "gate_type": list(GATE_TYPES),
    "pooling": ["", *POOLINGS],
    "data.format": ["fgvc", "vtab", "folder", "csv", "shapes", "ade20k", "seg_folder"],
    "data.cache": ["memory", "disk", "none"],
    "data.vtab_resize": ["tf_bilinear", "antialias"],
    "train.optimizer": ["sgd", "adamw"],
    "train.schedule": ["cosine", "cosine_epoch"],
    "train.precision": ["auto", "fp32", "bf16"],
    "train.logger": ["auto", "tensorboard", "wandb", "none"],
    "seg.sincos_pos_embed": ["interpolate", "rebuild"],
}


# One line per key for `gapt keys`. Keys missing here are described by their comment in the
# dataclasses above (read from this file's source), so a new key with a comment is covered.
KEY_HELP = {
    "backbone": "registered backbone name (see `gapt backbones`) or any timm ViT name",
    "weights": "backbone checkpoint file (MAE, MoCo v3, DINO, timm .pth/.safetensors), 'timm' for hub "
               "weights, or null for a random backbone",
    "method": "linear (head only) | full (fine-tune all) | vpt-shallow | vpt-deep | vpt-at-block | gated (GaPT) | "
              "lora | adaptformer | bitfit | ssf | vfpt (Fourier prompts) | e2vpt (key-value + masked prompts) | da-vpt | "
              "davpt-bias; parts compose with '+': gated+lora, vpt-deep+ssf; da-vpt+ = da-vpt+davpt-bias (DA-VPT+)",
    "num_prompts": "prompt tokens (prompt methods only)",
    "gate_init": "gates start at sigmoid(-gate_init): 10 means 4.5e-5, i.e. the blocks barely touch the prompts, "
                 "which pass through almost as inserted (a gate of 1 would be plain VPT-shallow)",
    "lora_targets": "lora: qkv (one A, B on timm's fused q/k/v projection, as peft) | q,v (separate q and v "
                    "updates; also written qv)",
    "learn_temperature": "also learn one attention temperature per block (AAS), clamped to [0.01, 10]",
    "insert_at_block": "vpt-at-block: prompts enter at this block (1-based); other methods need 1",
    "prompt_init": "random (VPT's uniform) | prototype (k-means centres of patch tokens: the SPT paper's variant) | "
                   "spt (SPT's code: single patch tokens of training images) | vipamin (matching + orthogonal)",
    "prompt_dropout": "dropout on the prompt tokens, in [0, 1)",
    "pooling": "'' = the backbone's rule; mean (all tokens but CLS, prompts included; MAE) | cls | "
               "img (patch tokens only) | prompt (prompt tokens only) | mean_normed (normalised, then the mean) | "
               "mean_fc_norm (mean, then a LayerNorm without affine: the VPT codebase's fresh MAE fc_norm, as "
               "VFPT's and E2VPT's code read MAE out)",
    "image_size": "input side in pixels; must be a multiple of the backbone's patch size",
    "data.val_split": "val split name ('' = the format's default)",
    "data.test_split": "test split name ('' = the format's default)",
    "data.csv_val": "csv: val 'path,label' file (relative to root); '' = carve data.val_fraction from train",
    "data.csv_test": "csv: test 'path,label' file (relative to root)",
    "data.skip_bad_images": "drop unreadable images (reported) instead of stopping",
    "data.num_workers": "data-loading worker processes",
    "train.epochs": "training epochs (numbered 1..epochs in logs and files)",
    "train.warmup_epochs": "linear learning-rate warm-up epochs before the cosine decay; auto = round(epochs / 10), "
                           "half up",
    "train.batch_size": "images per step, over all processes",
    "train.lr": "base learning rate (SPEC §6 sweeps it)",
    "train.weight_decay": "weight decay",
    "train.momentum": "SGD momentum",
    "train.seed": "seed of data order, augmentation, carve-outs, prompts and a random backbone",
    "train.compile": "torch.compile the training forward",
    "train.grad_checkpointing": "recompute block activations in the backward pass (less memory, slower)",
    "seg.poly_power": "segmentation: poly learning-rate decay power",
    "seg.min_lr": "segmentation: the learning rate the poly decay ends at",
    "out": "run folder (config.yaml, metrics.jsonl, results.json, tuned.safetensors, last.pt)",
}


def _comment_help() -> dict:
    """``{key: comment}`` from the ``name: type = default  # comment`` lines of the dataclasses above."""
    import inspect
    import re
    out = {}
    for cls, prefix in ((MethodSettings, ""), (RunConfig, ""), (DataConfig, "data."), (TrainConfig, "train."),
                        (SegConfig, "seg.")):
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):  # no source shipped: descriptions come from KEY_HELP only
            continue
        for m in re.finditer(r"^\s+(\w+): [^=]+=[^#\n]*#\s*(.+)$", source, re.M):
            out[prefix + m.group(1)] = m.group(2).strip()
    return out


def key_help(key: str) -> str:
    """One line describing ``key`` (empty if neither KEY_HELP nor a comment has one)."""
    return KEY_HELP.get(key) or _comment_help().get(key, "")


def all_keys(cls=RunConfig, prefix: str = "") -> List[str]:
    keys = []
    for f in fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if is_dataclass(default):
            keys += all_keys(type(default), prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


# Keys that moved: an old name is an error that says where it went, and a run folder's saved
# config.yaml from before is read with them translated (translate_moved_keys).
MOVED_KEYS = {"train.iterations": "seg.iterations", "train.eval_every": "seg.eval_every",
              "train.head_lr_mult": "seg.head_lr_mult", "train.poly_power": "seg.poly_power",
              "train.min_lr": "seg.min_lr", "crop_size": "seg.crop_size"}


def translate_moved_keys(d: dict) -> dict:
    """A nested config dict (a saved config.yaml) with the MOVED_KEYS under their new names."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    for old, new in MOVED_KEYS.items():
        *old_path, old_leaf = old.split(".")
        node = out
        for p in old_path:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict) or old_leaf not in node:
            continue
        value = node.pop(old_leaf)
        *new_path, new_leaf = new.split(".")
        target = out
        for p in new_path:
            target = target.setdefault(p, {})
        target.setdefault(new_leaf, value)
    return out


def _suggest(key: str, keys: List[str]) -> str:
    if key in MOVED_KEYS:
        return f" (moved to '{MOVED_KEYS[key]}')"
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # a bare leaf name such as "lr" should point at "train.lr"
        close = [k for k in keys if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def config_file_hint(word: str) -> str:
    """" (a config file? use --config WORD)" when a bare word names a YAML file or a preset."""
    looks_like_file = word.endswith((".yaml", ".yml")) or Path(word).is_file() or \
        (PRESETS_DIR / f"{word}.yaml").is_file()
    return f"; to read a config file use --config {word}" if looks_like_file else ""


def parse_overrides(overrides: List[str]) -> dict:
    """``["train.lr=0.5", "method=gated"]`` -> nested dict, values parsed as YAML scalars."""
    keys = all_keys()
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not KEY=VALUE{config_file_hint(item)}")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in keys:
            raise ConfigError(f"unknown config key '{key}'{_suggest(key, keys)}")
        parsed = yaml.safe_load(value) if value.strip() != "" else ""
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = parsed
    return out


def _check_unknown(d: Any, cls=RunConfig, prefix: str = "", source: str = "") -> None:
    if not isinstance(d, dict):
        return
    known = {f.name: f for f in fields(cls)}
    keys = all_keys()
    for k, v in d.items():
        full = prefix + str(k)
        if k not in known:
            raise ConfigError(f"unknown config key '{full}'{' in ' + source if source else ''}{_suggest(full, keys)}")
        default = known[k].default_factory() if known[k].default_factory is not dataclasses.MISSING else None
        if is_dataclass(default):
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{full}' must be a mapping, got {v!r}")
            _check_unknown(v, type(default), full + ".", source)


def _yaml_loader():
    """OmegaConf's own safe YAML loader (it reads 1e-4 as a float, as OmegaConf.load does)."""
    try:
        from omegaconf._utils import get_yaml_loader
        return get_yaml_loader()
    except ImportError:  # a future omegaconf without it
        return yaml.SafeLoader


PRESETS_DIR = Path(__file__).parent / "configs"


def resolve_config_path(path: str) -> Path:
    """A YAML file, or a packaged preset by name (``fgvc/mae_vitb16/cub``), from any folder."""
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (PRESETS_DIR / path, PRESETS_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    names = list_presets()
    close = difflib.get_close_matches(str(path).removesuffix(".yaml").removeprefix("configs/"), names, n=1,
                                      cutoff=0.6)
    hint = f" (did you mean the preset '{close[0]}'?)" if close else \
        " (packaged presets: `gapt presets` lists them, e.g. fgvc/mae_vitb16/cub)"
    raise ConfigError(f"config file not found: {path}{hint}")


def list_presets() -> List[str]:
    """Packaged preset names, e.g. ``vtab/mae_vitb16/dtd``."""
    return sorted(str(f.relative_to(PRESETS_DIR).with_suffix("")) for f in PRESETS_DIR.rglob("*.yaml"))


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None,
                base: Optional[dict] = None, saved: bool = False) -> RunConfig:
    """Merge defaults <- ``base`` <- YAML file <- overrides; validate; return a RunConfig.

    ``saved``: the file is a run folder's config.yaml, possibly written before keys moved
    (MOVED_KEYS); they are read under their new names."""
    layers = [OmegaConf.structured(RunConfig)]
    if base:
        _check_unknown(base)
        layers.append(OmegaConf.create(base))
    if path:
        p = resolve_config_path(path)
        path = str(p)
        try:
            loaded = yaml.load(p.read_text(), Loader=_yaml_loader())  # noqa: S506 - a safe loader
        except Exception as e:  # YAML syntax error
            raise ConfigError(f"cannot read config file {path}: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must be a mapping of keys (KEY: VALUE lines), "
                              f"not a {type(loaded).__name__}")
        if saved:
            loaded = translate_moved_keys(loaded)
        _check_unknown(loaded, source=str(path))
        layers.append(OmegaConf.create(loaded))
    if overrides:
        layers.append(OmegaConf.create(parse_overrides(overrides)))
    try:
        merged = OmegaConf.merge(*layers)
    except (ValidationError, ConfigKeyError, OmegaConfBaseException) as e:
        key = getattr(e, "full_key", None) or ""
        msg = str(getattr(e, 'msg', e)).splitlines()[0]
        raise ConfigError(f"bad value for config key '{key}': {msg}") from None
    cfg: RunConfig = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def get_key(cfg: RunConfig, key: str) -> Any:
    node: Any = cfg
    for p in key.split("."):
        node = getattr(node, p)
    return node


def validate(cfg: RunConfig) -> None:
    for key, allowed in CHOICES.items():
        if key == "method":
            continue  # a composition such as gated+lora: checked name by name below
        v = get_key(cfg, key)
        if v not in allowed:
            raise ConfigError(f"bad value for config key '{key}': {v!r}; choose one of {allowed}")
    try:
        names = method_components(cfg.method)
    except ValueError as e:
        raise ConfigError(f"bad value for config key 'method': {cfg.method!r}: {e}") from None
    cfg.method = "+".join(names)  # one spelling per composition: lora+gated -> gated+lora
    positive = ["num_prompts", "image_size", "train.epochs", "train.batch_size"]
    has_prompts = any(n in PROMPT_METHODS for n in names)
    for key in positive:
        if get_key(cfg, key) <= 0 and not (key == "num_prompts" and (not has_prompts or "da-vpt" in names
                                                                    and get_key(cfg, key) == 0)):
            raise ConfigError(f"bad value for config key '{key}': {get_key(cfg, key)} (must be > 0)")
    if cfg.train.lr <= 0:
        raise ConfigError(f"bad value for config key 'train.lr': {cfg.train.lr} (must be > 0)")
    if cfg.train.clip_grad_value < 0:
        raise ConfigError(f"bad value for config key 'train.clip_grad_value': {cfg.train.clip_grad_value} (must be >= 0)")
    if cfg.train.weight_decay < 0:
        raise ConfigError(f"bad value for config key 'train.weight_decay': {cfg.train.weight_decay} (must be >= 0)")
    w = cfg.train.warmup_epochs
    if w != "auto" and (isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= cfg.train.epochs):
        raise ConfigError(f"bad value for config key 'train.warmup_epochs': {w!r} "
                          f"(must be 'auto' or an integer in [0, train.epochs={cfg.train.epochs}])")
    if not 0 <= cfg.prompt_dropout < 1:
        raise ConfigError(f"bad value for config key 'prompt_dropout': {cfg.prompt_dropout} (must be in [0, 1))")
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError(f"bad value for config key 'data.val_fraction': {cfg.data.val_fraction} (must be in (0, 1))")
    if cfg.gate_type == "hard" and "gated" not in names:
        raise ConfigError(f"config key 'gate_type': 'hard' needs method=gated (got method={cfg.method!r})")
    if not cfg.gate_temperature > 0:
        raise ConfigError(f"bad value for config key 'gate_temperature': {cfg.gate_temperature} (must be > 0)")
    if cfg.insert_at_block < 1:
        raise ConfigError(f"bad value for config key 'insert_at_block': {cfg.insert_at_block} (blocks count from 1)")
    if cfg.learn_temperature and not has_prompts:
        raise ConfigError(f"config key 'learn_temperature': true needs a prompt part ({', '.join(PROMPT_METHODS)}); "
                          f"got method={cfg.method!r}")
    try:
        cfg.check_parts()
        if "lora" in names:
            cfg.lora_targets = canonical_lora_targets(cfg.lora_targets)
    except SettingError as e:
        raise ConfigError(f"bad value for config key '{e.key}': {e}") from None


def warmup_epochs(train: TrainConfig) -> int:
    """``train.warmup_epochs`` as a number: ``auto`` is epochs / 10 rounded half up (the
    reference's 10 of 100; 0 below 5 epochs), so a short run needs no second override."""
    w = train.warmup_epochs
    return int(train.epochs / 10 + 0.5) if w == "auto" else int(w)


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RunConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


# Keys that never change what a run computes (where it is written, where its inputs are read
# from, how fast it goes): a run folder found again with other values here holds the same run.
RUN_FREE_KEYS = ("out", "device", "weights", "data.root", "data.num_workers", "data.cache", "data.cache_dir",
                 "train.eval_batch_size")


def flat_dict(cfg: Any) -> dict:
    """A RunConfig (or a nested dict) as ``{"train.lr": 0.1, ...}``."""
    out: dict = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v
    walk(cfg if isinstance(cfg, dict) else to_dict(cfg), "")
    return out


def run_differences(saved: Any, wanted: Any, free_keys=RUN_FREE_KEYS) -> dict:
    """``{key: (saved value, wanted value)}`` for the keys, other than ``free_keys``, in which two
    configs (RunConfigs or nested dicts) differ; empty when they describe the same run."""
    old, new = flat_dict(saved), flat_dict(wanted)
    return {k: (old.get(k), v) for k, v in new.items() if k not in free_keys and old.get(k) != v}


def same_run(saved: Any, wanted: Any, free_keys=RUN_FREE_KEYS) -> bool:
    """Whether a run folder's saved config and the wanted one give the same run (see run_differences)."""
    return not run_differences(saved, wanted, free_keys)
