"""Datasets for prompt tuning: FGVC (VPT JSON splits), VTAB-1k lists, image folders, CSV lists,
and generated ``shapes`` tasks, all behind one call::

    bundle = build_datasets(cfg.data, image_size=224, seed=42)
    bundle.train, bundle.val, bundle.test   # items: (float32 (3, S, S) normalised, int label)
    bundle.num_classes, bundle.class_names, bundle.info
    tf = eval_transform(bundle.info, 224)   # PIL image -> tensor, as the eval splits do it

Every problem with the data (missing split file or folder, a label out of range, an
unreadable image, an unknown dataset name, an empty split) raises :class:`DataError`
before training starts, naming the file (and line).
"""
from __future__ import annotations

import logging

from .bundle import DatasetBundle, SplitList
from .cache import ImageCache
from .dataset import ImageListDataset
from .errors import DataError
from .fgvc import FGVC_DATASETS
from .folder import IMAGE_EXTENSIONS, stratified_carve
from .transforms import (IMAGENET_MEAN, IMAGENET_STD, FixedSizeDecoder, TrainAugment, eval_transform,
                         resize_dim, tf_resize_bilinear)
from .vtab import VTAB_GROUPS, VTAB_TASKS

__all__ = ["build_datasets", "DatasetBundle", "DataError", "eval_transform", "FGVC_DATASETS", "VTAB_TASKS",
           "VTAB_GROUPS", "FORMATS", "ImageListDataset", "ImageCache", "FixedSizeDecoder", "TrainAugment",
           "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "resize_dim", "tf_resize_bilinear",
           "stratified_carve", "SplitList"]

log = logging.getLogger("gapt.data")

FORMATS = ("fgvc", "vtab", "folder", "csv", "shapes")
SEGMENTATION_FORMATS = ("ade20k", "seg_folder")  # read by gapt.seg.data, not here
_CHOICES = {"cache": ("memory", "disk", "none"), "vtab_resize": ("tf_bilinear", "antialias")}


def _as_data_config(cfg_data):
    if isinstance(cfg_data, dict):
        from gapt.config import DataConfig
        return DataConfig(**cfg_data)
    return cfg_data


def _validate(cfg_data, image_size: int) -> None:
    if cfg_data.format in SEGMENTATION_FORMATS:
        raise DataError(f"data.format={cfg_data.format!r} is a segmentation format: use `gapt seg` "
                        f"(gapt.seg.data.build_seg_datasets); classification formats: {', '.join(FORMATS)}")
    if cfg_data.format not in FORMATS:
        raise DataError(f"unknown data.format {cfg_data.format!r}; valid formats: {', '.join(FORMATS)}")
    for key, allowed in _CHOICES.items():
        if getattr(cfg_data, key) not in allowed:
            raise DataError(f"bad value for data.{key}: {getattr(cfg_data, key)!r}; choose one of {list(allowed)}")
    if int(image_size) <= 0:
        raise DataError(f"image_size must be > 0, got {image_size}")
    if not 0 < float(cfg_data.val_fraction) < 1:
        raise DataError(f"bad value for data.val_fraction: {cfg_data.val_fraction} (must be in (0, 1))")


def _generated(cfg_data, image_size: int, seed: int) -> DatasetBundle:
    """Generated datasets live in their own module, imported only when asked for."""
    try:
        from .synthetic import build_synthetic_bundle
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.synthetic":
            raise
        raise DataError(f"data.format={cfg_data.format!r} is not available in this installation "
                        f"(gapt/data/synthetic.py is missing)") from e
    try:
        return build_synthetic_bundle(cfg_data, image_size, seed)
    except DataError:
        raise
    except ValueError as e:  # e.g. an unknown task name, reported by the generator
        raise DataError(str(e)) from e


def check_classes(class_names, cfg_data, source: str) -> None:
    """A one-class task trains nothing; data.num_classes, when given, must match what was found."""
    given = int(getattr(cfg_data, "num_classes", 0) or 0)
    if given and given != len(class_names):
        raise DataError(f"data.num_classes={given} but {source} has {len(class_names)} classes")
    if len(class_names) < 2:
        raise DataError(f"{source} has a single class ({', '.join(map(str, class_names)) or 'none'}): "
                        f"classification needs at least 2")


def build_datasets(cfg_data, image_size: int = 224, seed: int = 42,
                   splits=("train", "val", "test")) -> DatasetBundle:
    """Read, check and (for un-augmented splits) cache the dataset ``cfg_data`` describes.

    ``cfg_data`` is a :class:`gapt.config.DataConfig` (or a dict of its keys). ``seed`` fixes
    the carve-out of missing val/test splits (folder, csv) and generated datasets. Only the
    ``splits`` named are checked and cached (the others are None in the bundle); the split
    lists are still all read, since carve-outs depend on them.
    """
    cfg_data = _as_data_config(cfg_data)
    _validate(cfg_data, image_size)
    fmt = cfg_data.format
    if fmt == "shapes":
        return _generated(cfg_data, image_size, seed)
    if fmt == "fgvc":
        from .fgvc import parse_fgvc
        parsed = parse_fgvc(cfg_data)
    elif fmt == "vtab":
        from .vtab import parse_vtab
        parsed = parse_vtab(cfg_data)
    elif fmt == "folder":
        from .folder import parse_folder
        parsed = parse_folder(cfg_data, seed)
    else:
        from .folder import parse_csv
        parsed = parse_csv(cfg_data, seed)
    if len(parsed.splits["train"]):  # an empty train split is reported by assemble, by name
        check_classes(parsed.class_names, cfg_data, parsed.source)
    from .bundle import assemble
    bundle = assemble(parsed, cfg_data, image_size, splits)
    info = bundle.info
    log.info("data: %s %s: %d train / %d val / %d test images, %d classes; %s",
             info["format"], info["name"], info["num_train"], info["num_val"], info["num_test"],
             bundle.num_classes, info["resize"])
    for note in info["notes"]:
        log.info("data: %s", note)
    return bundle
