"""``DatasetBundle`` and how one is assembled from parsed split lists.

Format readers (fgvc, vtab, folder, csv) only parse: they return a :class:`ParsedData`
with one :class:`SplitList` per split. :func:`assemble` then does the work every format
shares: checks or caches each split's images, drops or reports bad ones, builds the
datasets and the ``info`` dict recorded in results.json.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

from .cache import build_image_cache, build_resized_cache, check_images, default_cache_dir
from .dataset import ImageListDataset
from .errors import DataError
from .transforms import NORMALISATION, FixedSizeDecoder, TrainAugment

log = logging.getLogger("gapt.data")

SPLITS = ("train", "val", "test")


@dataclass
class DatasetBundle:
    """The three splits of one dataset plus what results.json records about it."""
    train: object
    val: object
    test: object
    num_classes: int
    class_names: List[str]
    info: dict = field(default_factory=dict)


@dataclass
class SplitList:
    """A parsed split: absolute image paths, labels, and where each entry was listed."""
    source: str                      # e.g. "train800.txt", "train.json", "train/", "carved from train"
    paths: List[str] = field(default_factory=list)
    labels: List[int] = field(default_factory=list)
    origins: List[str] = field(default_factory=list)   # e.g. "/d/dtd/train800.txt line 12"

    def __len__(self) -> int:
        return len(self.paths)

    def add(self, path: str, label: int, origin: str) -> None:
        self.paths.append(path)
        self.labels.append(int(label))
        self.origins.append(origin)

    def subset(self, indices: Sequence[int], source: str = "") -> "SplitList":
        idx = list(indices)
        return SplitList(source or self.source, [self.paths[i] for i in idx],
                         [self.labels[i] for i in idx], [self.origins[i] for i in idx])

    def __add__(self, other: "SplitList") -> "SplitList":
        return SplitList(f"{self.source} + {other.source}", self.paths + other.paths,
                         self.labels + other.labels, self.origins + other.origins)


@dataclass
class ParsedData:
    """What a format reader found, before any image is opened."""
    format: str
    name: str
    root: str
    class_names: List[str]
    splits: Dict[str, SplitList]           # train / val / test
    split_names: Dict[str, str]            # human text per split for info["splits"]
    source: str
    train_augmented: bool                  # FGVC-style random crop + flip on train
    eval_kind: str                         # FixedSizeDecoder kind for un-augmented splits
    cache_root: str                        # <cache_root>/.gapt_cache is the default disk cache
    notes: List[str] = field(default_factory=list)


def _resolve_failures(sl: SplitList, failures: Dict[int, str], split: str, skip: bool) -> List[int]:
    """Row indices to keep; raises a DataError naming the first bad file unless skipping."""
    if failures and not skip:
        first = min(failures)
        more = len(failures) - 1
        raise DataError(
            f"cannot read image {sl.paths[first]} (listed at {sl.origins[first]}): {failures[first]}"
            + (f" [and {more} more bad image{'s' if more > 1 else ''} in the {split} split]" if more else "")
            + "; fix or remove it, or set data.skip_bad_images=true to drop bad images")
    return [i for i in range(len(sl)) if i not in failures]


def assemble(parsed: ParsedData, cfg_data, image_size: int, splits: Sequence[str] = SPLITS) -> DatasetBundle:
    """The bundle of ``parsed``; only the ``splits`` named are checked, cached and built (the others
    are None), so `gapt eval --split test` reads no train or val image."""
    cache_mode = cfg_data.cache
    skip = bool(cfg_data.skip_bad_images)
    cache_dir = cfg_data.cache_dir or default_cache_dir(parsed.cache_root)
    datasets: Dict[str, ImageListDataset] = {}
    skipped: Dict[str, int] = {}
    examples: List[str] = []
    augment = TrainAugment(image_size) if parsed.train_augmented else None
    decoder = FixedSizeDecoder(parsed.eval_kind, image_size)

    for split in SPLITS:
        sl = parsed.splits[split]
        if split not in splits:
            continue
        if len(sl) == 0:
            raise DataError(f"the {split} split ({sl.source}) of {parsed.root} lists no images")
        label = f"{parsed.format}-{parsed.name or 'data'}-{split}-{os.path.splitext(sl.source)[0]}"
        words = f"the {split} split ({sl.source})"  # what the log says; label names cache files
        augmented = split == "train" and augment is not None
        cache = None
        if augmented and cache_mode != "none" and cfg_data.cache_augmented:
            cache, failures = build_resized_cache(sl.paths, augment, cache_mode, cache_dir, label, words)
        elif augmented or cache_mode == "none":
            failures = check_images(sl.paths, label, marker_dir=cache_dir if cache_mode == "disk" else "",
                                    words=words)
        else:
            cache, failures = build_image_cache(sl.paths, decoder, cache_mode, cache_dir, label, words)
        keep = _resolve_failures(sl, failures, split, skip)
        if failures:
            skipped[split] = len(failures)
            examples += [f"{sl.paths[i]}: {failures[i]}" for i in sorted(failures)][:10 - len(examples)]
            log.warning("skipped %d unreadable image(s) in the %s split (%s)", len(failures), split, sl.source)
        if not keep:
            raise DataError(f"the {split} split ({sl.source}) of {parsed.root} has no readable images")
        kept = sl.subset(keep)
        if augmented:
            ds = ImageListDataset(kept.paths, kept.labels, parsed.class_names, augment=augment, cache=cache,
                                  rows=keep if cache is not None else None, split=split)
        else:
            ds = ImageListDataset(kept.paths, kept.labels, parsed.class_names, decoder=decoder,
                                  cache=cache, rows=keep if cache is not None else None, split=split)
        datasets[split] = ds

    if parsed.train_augmented:
        resize = f"{augment.description} (train); {decoder.description} (eval)"
    else:
        resize = decoder.description
    total_skipped = sum(skipped.values())
    if total_skipped:
        log.warning("skipped %d unreadable image(s) in total (data.skip_bad_images=true)", total_skipped)
    info = {
        "format": parsed.format,
        "name": parsed.name,
        "root": parsed.root,
        "splits": dict(parsed.split_names),
        "source": parsed.source,
        "resize": resize,
        "normalisation": NORMALISATION,
        "num_train": len(datasets.get("train") or parsed.splits["train"]),
        "num_val": len(datasets.get("val") or parsed.splits["val"]),
        "num_test": len(datasets.get("test") or parsed.splits["test"]),
        "skipped_images": total_skipped,
        "num_classes": len(parsed.class_names),
        "class_names": list(parsed.class_names),
        "image_size": int(image_size),
        "eval_resize": parsed.eval_kind,
        "train_augmented": parsed.train_augmented,
        "cache": cache_mode,
        "cache_augmented": bool(cfg_data.cache_augmented and parsed.train_augmented and cache_mode != "none"),
        "notes": list(parsed.notes),
        # False when every val image is also a train image (a final run on train + val)
        "val_held_out": not set(parsed.splits["val"].paths) <= set(parsed.splits["train"].paths),
    }
    if total_skipped:
        info["skipped"] = skipped
        info["skipped_examples"] = examples
    return DatasetBundle(datasets.get("train"), datasets.get("val"), datasets.get("test"),
                         num_classes=len(parsed.class_names), class_names=list(parsed.class_names), info=info)
