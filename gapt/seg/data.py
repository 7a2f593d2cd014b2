"""Semantic segmentation datasets: ADE20K and user folders of image / mask pairs.

Every problem a run would hit later (a missing folder, an image without a mask, a mask that is
not single-channel or cannot be read, a label out of range) is raised at construction as a
``SegDataError`` that names the file. Headers are always checked; the pixel scan for label
values is on by default (``check_labels``) and can be turned off for large datasets, in which
case a bad label is still reported, by the same error, when its item is loaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from .palette import ADE20K_CLASSES
from .transforms import IGNORE_INDEX, SegEvalPipeline

PathLike = Union[str, Path]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SINGLE_CHANNEL_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B")
ADE20K_SPLITS = {"training": "training", "train": "training",
                 "validation": "validation", "val": "validation"}

Pipeline = Callable[[np.ndarray, np.ndarray, Optional[np.random.Generator]], Tuple[torch.Tensor, torch.Tensor]]


class SegDataError(ValueError):
    """Segmentation data that cannot be used; the message names the folder or file."""


def read_class_names(path: PathLike) -> List[str]:
    """One class name per line; blank lines are skipped, names must be unique."""
    path = Path(path)
    if not path.is_file():
        raise SegDataError(f"class-name file not found: {path}")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise SegDataError(f"class-name file {path} lists no classes (expected one name per line)")
    seen = set()
    for n in names:
        if n in seen:
            raise SegDataError(f"class-name file {path} lists '{n}' twice")
        seen.add(n)
    return names


def map_labels(raw: np.ndarray, reduce_zero_label: bool) -> np.ndarray:
    """Raw mask values -> training labels (uint8, 255 = ignore).

    ``reduce_zero_label`` (ADE20K): 0 -> 255 and every other value v -> v - 1; a raw 255 stays
    ignored (MMSegmentation's LoadAnnotations). Otherwise labels are used as they are.
    """
    raw = raw.astype(np.int64, copy=False)
    if reduce_zero_label:
        out = raw - 1
        out[(raw == 0) | (raw == IGNORE_INDEX)] = IGNORE_INDEX
    else:
        out = raw
    return out.astype(np.uint8) if out.size == 0 or (out.min() >= 0 and out.max() <= 255) else out


def _bad_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    values = np.unique(labels)
    return values[(values != IGNORE_INDEX) & ((values < 0) | (values >= num_classes))]


def _open_mask(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
    except Exception as e:  # PIL raises several types for unreadable files
        raise SegDataError(f"mask {path} cannot be read: {e}") from e
    if img.mode not in SINGLE_CHANNEL_MODES:
        img.close()
        raise SegDataError(f"mask {path} is not single-channel (PIL mode {img.mode}); "
                           "masks must hold one class index per pixel (mode L, P or I)")
    return img


def load_mask(path: PathLike) -> np.ndarray:
    """A mask file's raw values as an (H, W) integer array."""
    path = Path(path)
    with _open_mask(path) as img:
        try:
            arr = np.array(img)
        except Exception as e:
            raise SegDataError(f"mask {path} cannot be decoded: {e}") from e
    if arr.ndim != 2:
        raise SegDataError(f"mask {path} is not single-channel (array shape {arr.shape})")
    return arr


def load_image(path: PathLike) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB."""
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))
    except Exception as e:
        raise SegDataError(f"image {path} cannot be read: {e}") from e


class SegDataset(torch.utils.data.Dataset):
    """Pairs ``images_dir/<stem><image suffix>`` with ``masks_dir/<stem><mask_suffix>``.

    An item is ``{"image": (3, h, w) float32, "label": (h', w') int64 (255 = ignore),
    "index": int, "path": str}`` as produced by ``pipeline(image_uint8, label_uint8, rng)``.
    The rng of item i is ``numpy.random.default_rng((seed, epoch, i))``: the same item gets the
    same augmentation in every worker layout; call ``set_epoch`` to draw new ones.
    """

    def __init__(self, images_dir: PathLike, masks_dir: PathLike, num_classes: int,
                 class_names: Optional[Sequence[str]] = None, reduce_zero_label: bool = False,
                 pipeline: Optional[Pipeline] = None, mask_suffix: str = ".png",
                 image_suffixes: Sequence[str] = IMAGE_SUFFIXES, check_labels: bool = True,
                 seed: int = 0, name: str = "segmentation"):
        self.images_dir, self.masks_dir = Path(images_dir), Path(masks_dir)
        if not 1 <= num_classes <= IGNORE_INDEX:
            raise SegDataError(f"num_classes must lie in 1..{IGNORE_INDEX} (255 is the ignore label), got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise SegDataError(f"{len(class_names)} class names given for num_classes={num_classes}")
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.reduce_zero_label = bool(reduce_zero_label)
        self.pipeline = pipeline if pipeline is not None else SegEvalPipeline(scale=None)
        self.mask_suffix = mask_suffix
        self.seed, self.epoch = int(seed), 0
        self.name = name
        for label, folder in (("image", self.images_dir), ("mask", self.masks_dir)):
            if not folder.is_dir():
                raise SegDataError(f"{name}: {label} folder not found: {folder}")
        suffixes = {s.lower() for s in image_suffixes}
        images = sorted(p for p in self.images_dir.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        if not images:
            raise SegDataError(f"{name}: no images ({', '.join(sorted(suffixes))}) in {self.images_dir}")
        self.samples: List[Tuple[Path, Path]] = []
        for img in images:
            mask = self.masks_dir / (img.stem + mask_suffix)
            if not mask.is_file():
                raise SegDataError(f"{name}: image {img} has no annotation (expected {mask})")
            self.samples.append((img, mask))
        self._check(check_labels)

    # -- validation ---------------------------------------------------------------------------
    def _check(self, check_labels: bool) -> None:
        for img_path, mask_path in self.samples:
            with _open_mask(mask_path) as mask:
                mask_size = mask.size
            try:
                with Image.open(img_path) as img:
                    image_size = img.size
            except Exception as e:
                raise SegDataError(f"{self.name}: image {img_path} cannot be read: {e}") from e
            if mask_size != image_size:
                raise SegDataError(f"{self.name}: mask {mask_path} is {mask_size[0]}x{mask_size[1]} (WxH) but its "
                                   f"image {img_path} is {image_size[0]}x{image_size[1]}")
            if check_labels:
                self._check_values(load_mask(mask_path), mask_path)

    def _check_values(self, raw: np.ndarray, mask_path: Path) -> np.ndarray:
        labels = map_labels(raw, self.reduce_zero_label)
        bad = _bad_labels(labels, self.num_classes)
        if bad.size:
            raw_bad = int(bad[0]) + 1 if self.reduce_zero_label else int(bad[0])
            allowed = (f"0..{self.num_classes} (0 = ignore, reduce_zero_label)" if self.reduce_zero_label
                       else f"0..{self.num_classes - 1}")
            raise SegDataError(f"{self.name}: mask {mask_path} holds label value {raw_bad}, out of range for "
                               f"num_classes={self.num_classes} (allowed {allowed}, or 255 = ignore)")
        return labels

    # -- items ----------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch, int(index)))

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """The un-augmented (image uint8 RGB, label uint8) pair of item ``index``."""
        img_path, mask_path = self.samples[index]
        image = load_image(img_path)
        label = self._check_values(load_mask(mask_path), mask_path)
        if label.shape != image.shape[:2]:
            raise SegDataError(f"{self.name}: mask {mask_path} has shape {label.shape}, its image {img_path} "
                               f"{image.shape[:2]}")
        return image, label

    def __getitem__(self, index: int) -> dict:
        image, label = self.load(index)
        image, label = self.pipeline(image, label, self.rng(index))
        return {"image": image, "label": label, "index": int(index), "path": str(self.samples[index][0])}

    def __repr__(self) -> str:
        return (f"SegDataset({self.name}: {len(self)} images in {self.images_dir}, masks in {self.masks_dir}, "
                f"{self.num_classes} classes, reduce_zero_label={self.reduce_zero_label}, {self.pipeline!r})")


def build_ade20k(root: PathLike, split: str = "training", pipeline: Optional[Pipeline] = None,
                 check_labels: bool = True, seed: int = 0) -> SegDataset:
    """ADE20K (SceneParsing, 150 classes): ``root/images/<split>/*.jpg`` with
    ``root/annotations/<split>/*.png``; split ``training``/``train`` or ``validation``/``val``."""
    if split not in ADE20K_SPLITS:
        raise SegDataError(f"ADE20K split must be one of {sorted(ADE20K_SPLITS)}, got '{split}'")
    root = Path(root)
    if not root.is_dir():
        raise SegDataError(f"ADE20K root folder not found: {root}")
    folder = ADE20K_SPLITS[split]
    return SegDataset(root / "images" / folder, root / "annotations" / folder, num_classes=150,
                      class_names=ADE20K_CLASSES, reduce_zero_label=True, pipeline=pipeline,
                      mask_suffix=".png", image_suffixes=(".jpg", ".jpeg", ".png"),
                      check_labels=check_labels, seed=seed, name=f"ADE20K {folder}")


def build_folder_seg(images_dir: PathLike, masks_dir: PathLike, classes_file: PathLike,
                     pipeline: Optional[Pipeline] = None, reduce_zero_label: bool = False,
                     mask_suffix: str = ".png", check_labels: bool = True, seed: int = 0) -> SegDataset:
    """A user's pairs: images in ``images_dir``, masks (same stem + ``mask_suffix``) in
    ``masks_dir``, class names one per line in ``classes_file``; labels as they are, 255 ignored."""
    names = read_class_names(classes_file)
    return SegDataset(images_dir, masks_dir, num_classes=len(names), class_names=names,
                      reduce_zero_label=reduce_zero_label, pipeline=pipeline, mask_suffix=mask_suffix,
                      check_labels=check_labels, seed=seed, name=f"folder {Path(images_dir).name}")


# the config's data.format values and each one's default (train, val) split names
SEG_FORMATS = ("ade20k", "seg_folder")
DEFAULT_SPLITS = {"ade20k": ("training", "validation"), "seg_folder": ("train", "val")}


def build_seg_split(format: str, root: PathLike, split: str, pipeline: Optional[Pipeline] = None, *,
                    classes_file: str = "classes.txt", reduce_zero_label: bool = False, mask_suffix: str = ".png",
                    check_labels: bool = True, seed: int = 0) -> SegDataset:
    """One split of a format.

    - ``ade20k``: ``root`` as in :func:`build_ade20k`; ``split`` training | validation.
    - ``seg_folder``: ``root/images/<split>``, ``root/masks/<split>`` and ``root/<classes_file>``.
    """
    if format == "ade20k":
        return build_ade20k(root, split, pipeline, check_labels, seed)
    if format == "seg_folder":
        root = Path(root)
        if not root.is_dir():
            raise SegDataError(f"segmentation root folder not found: {root}")
        return build_folder_seg(root / "images" / split, root / "masks" / split, root / classes_file, pipeline,
                                reduce_zero_label, mask_suffix, check_labels, seed)
    raise SegDataError(f"unknown segmentation data format '{format}'; expected one of {list(SEG_FORMATS)}")


def build_seg_datasets(format: str, root: PathLike, train_pipeline: Optional[Pipeline] = None,
                       eval_pipeline: Optional[Pipeline] = None, *, train_split: str = "",
                       val_split: str = "", classes_file: str = "classes.txt",
                       reduce_zero_label: bool = False, mask_suffix: str = ".png",
                       check_labels: bool = True, seed: int = 0) -> Tuple[SegDataset, SegDataset]:
    """(train, val) datasets of a format (:func:`build_seg_split`); split names default to
    training / validation (``ade20k``) and train / val (``seg_folder``)."""
    if format not in DEFAULT_SPLITS:
        raise SegDataError(f"unknown segmentation data format '{format}'; expected one of {list(SEG_FORMATS)}")
    default_train, default_val = DEFAULT_SPLITS[format]
    kw = dict(classes_file=classes_file, reduce_zero_label=reduce_zero_label, mask_suffix=mask_suffix,
              check_labels=check_labels, seed=seed)
    return (build_seg_split(format, root, train_split or default_train, train_pipeline, **kw),
            build_seg_split(format, root, val_split or default_val, eval_pipeline, **kw))
