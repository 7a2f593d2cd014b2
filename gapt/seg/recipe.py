"""The segmentation recipe (SPEC §6, MMSegmentation ``setr_vit-l_pup_8xb2-160k_ade20k``): the config
checks, the scales and the sliding-window stride derived from ``seg.crop_size``, the eval file's name,
and the datasets of a config through the one dataset builder (:func:`gapt.seg.data.build_seg_split`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

from .. import config as C
from .data import DEFAULT_SPLITS, SEG_FORMATS, SegDataset, build_seg_split
from .transforms import SegEvalPipeline, SegTrainPipeline

EVAL_FILE = "eval_{split}.json"
HEAD_CHANNELS = 256   # SETR-PUP's head width


# -- values derived from crop_size ----------------------------------------------------------------
def train_scale(crop_size: int) -> Tuple[int, int]:
    """The resize target before the random ratio: (2048, 512) for a 512 crop, 4:1 in general."""
    return 4 * crop_size, crop_size


def slide_stride(crop_size: int) -> int:
    """Sliding-window stride: two thirds of the crop, rounded (341 for 512)."""
    return max(int(round(crop_size * 2 / 3)), 1)


def train_pipeline(crop_size: int) -> SegTrainPipeline:
    return SegTrainPipeline(crop_size, scale=train_scale(crop_size))


def eval_pipeline(crop_size: int) -> SegEvalPipeline:
    return SegEvalPipeline(scale=train_scale(crop_size))


# -- config checks ------------------------------------------------------------------------------
def check_seg_config(cfg: C.RunConfig) -> None:
    if cfg.data.format not in SEG_FORMATS:
        raise C.ConfigError(f"bad value for config key 'data.format': {cfg.data.format!r}; `gapt seg` needs one "
                            f"of {list(SEG_FORMATS)}")
    if not cfg.data.root:
        raise C.ConfigError("config key 'data.root' is empty: point it at the dataset folder")
    sg, t = cfg.seg, cfg.train
    if sg.crop_size <= 0:
        raise C.ConfigError(f"bad value for config key 'seg.crop_size': {sg.crop_size} (must be > 0)")
    if sg.iterations <= 0:
        raise C.ConfigError(f"bad value for config key 'seg.iterations': {sg.iterations}; segmentation is "
                            "iteration-based, set it (the SETR recipe: 160000)")
    if sg.eval_every < 0:
        raise C.ConfigError(f"bad value for config key 'seg.eval_every': {sg.eval_every} (must be >= 0)")
    if sg.head_lr_mult <= 0:
        raise C.ConfigError(f"bad value for config key 'seg.head_lr_mult': {sg.head_lr_mult} (must be > 0)")
    if sg.poly_power < 0:
        raise C.ConfigError(f"bad value for config key 'seg.poly_power': {sg.poly_power} (must be >= 0)")
    if not 0 <= sg.min_lr <= t.lr:
        raise C.ConfigError(f"bad value for config key 'seg.min_lr': {sg.min_lr} (must be in [0, train.lr={t.lr}])")
    if cfg.prompt_init != "random":
        raise C.ConfigError(f"bad value for config key 'prompt_init': {cfg.prompt_init!r}; `gapt seg` supports "
                            "'random' only")
    if cfg.gate_type != "soft":  # the paper's hard gates are a classification ablation (Table 4)
        raise C.ConfigError(f"bad value for config key 'gate_type': {cfg.gate_type!r}; `gapt seg` supports 'soft' only")


# -- data ---------------------------------------------------------------------------------------
def seg_task_name(cfg: C.RunConfig) -> str:
    return "ade20k" if cfg.data.format == "ade20k" else (Path(cfg.data.root).name or "seg_folder")


def seg_dataset(cfg: C.RunConfig, split: str, pipeline, seed: int = 0) -> SegDataset:
    """One split: ``train``/``val`` (data.train_split / data.val_split, else the format's names)
    through ``pipeline``.

    ADE20K's labels are not pixel-scanned at construction (22k masks; a bad value is still
    reported when its item loads); folder datasets are scanned.
    """
    d = cfg.data
    if split not in ("train", "val"):
        raise ValueError(f"unknown split '{split}'; valid: train, val")
    if d.format not in DEFAULT_SPLITS:
        raise C.ConfigError(f"bad value for config key 'data.format': {d.format!r}; `gapt seg` needs one of "
                            f"{list(SEG_FORMATS)}")
    default_train, default_val = DEFAULT_SPLITS[d.format]
    name = (d.train_split or default_train) if split == "train" else (d.val_split or default_val)
    return build_seg_split(d.format, d.root, name, pipeline, check_labels=d.format != "ade20k", seed=seed)


def data_info(cfg: C.RunConfig, train: Optional[SegDataset], val: SegDataset) -> Dict:
    info = {"format": cfg.data.format, "root": cfg.data.root, "task": seg_task_name(cfg),
            "num_classes": val.num_classes, "val_images": len(val),
            "train_transform": f"random resize of {train_scale(cfg.seg.crop_size)} x 0.5-2.0, crop {cfg.seg.crop_size} "
                               "(cat_max_ratio 0.75), flip, photometric distortion, ImageNet normalisation",
            "eval_transform": f"keep-ratio resize into {train_scale(cfg.seg.crop_size)}, ImageNet normalisation"}
    if train is not None:
        info["train_images"] = len(train)
    return info
