"""VTAB-1k as images plus split lists (the layout the community ships; no TensorFlow).

``<root>/<task>/`` (or ``root`` itself when it holds the lists) contains ``train800.txt``,
``val200.txt``, ``train800val200.txt`` and ``test.txt``; each line is
``images/<split>/000123.jpg <label>`` with the path relative to the task folder.
No augmentation; every split is resized as the reference did (see transforms.py).
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

from .bundle import ParsedData, SplitList
from .errors import DataError

# task folder name -> (number of classes, group)
VTAB_TASKS: Dict[str, Tuple[int, str]] = {
    "cifar": (100, "natural"),
    "caltech101": (102, "natural"),
    "dtd": (47, "natural"),
    "oxford_flowers102": (102, "natural"),
    "oxford_iiit_pet": (37, "natural"),
    "svhn": (10, "natural"),
    "sun397": (397, "natural"),
    "patch_camelyon": (2, "specialized"),
    "eurosat": (10, "specialized"),
    "resisc45": (45, "specialized"),
    "diabetic_retinopathy": (5, "specialized"),
    "clevr_count": (8, "structured"),
    "clevr_dist": (6, "structured"),
    "dmlab": (6, "structured"),
    "kitti": (4, "structured"),
    "dsprites_loc": (16, "structured"),
    "dsprites_ori": (16, "structured"),
    "smallnorb_azi": (18, "structured"),
    "smallnorb_ele": (9, "structured"),
}
VTAB_GROUPS = ("natural", "specialized", "structured")

_ALIASES = {"cifar100": "cifar", "caltech": "caltech101", "flowers102": "oxford_flowers102",
            "pets": "oxford_iiit_pet", "oxford_pet": "oxford_iiit_pet", "sun": "sun397",
            "camelyon": "patch_camelyon", "resisc": "resisc45", "retinopathy": "diabetic_retinopathy"}

DEFAULT_SPLITS = {"train": "train800", "val": "val200", "test": "test"}
FINAL_TRAIN_SPLIT = "train800val200"


def vtab_group_tasks(group: str) -> List[str]:
    return [t for t, (_, g) in VTAB_TASKS.items() if g == group]


def resolve_vtab_task(name: str, root: str = "") -> str:
    """Canonical task name; an empty name falls back to the root folder's name."""
    key = (name or "").strip().lower()
    if key.startswith("vtab-"):
        key = key[len("vtab-"):]
    key = _ALIASES.get(key, key)
    if not key and root:
        base = os.path.basename(os.path.normpath(root)).lower()
        if base in VTAB_TASKS:
            return base
    if key not in VTAB_TASKS:
        raise DataError(f"unknown VTAB task data.name={name!r}; valid tasks: {', '.join(VTAB_TASKS)}")
    return key


def _list_file(stem: str) -> str:
    return stem if stem.endswith(".txt") else stem + ".txt"


def _task_folder(root: str, task: str, train_file: str) -> str:
    if not root:
        raise DataError("data.root is empty; set it to the VTAB-1k folder (holding <task>/) or to the task folder")
    if not os.path.isdir(root):
        raise DataError(f"VTAB folder not found: {root} (data.root)")
    nested = os.path.join(root, task)
    if os.path.isdir(nested):
        return nested
    if os.path.isfile(os.path.join(root, train_file)):
        return root
    raise DataError(f"missing split file {os.path.join(nested, train_file)}: no task folder {nested} "
                    f"and no {train_file} in {root}")


def read_split_list(path: str, folder: str, num_classes: int) -> SplitList:
    """Parse ``<relative path> <label>`` lines; DataError names file and line on any bad line."""
    if not os.path.isfile(path):
        raise DataError(f"missing split file {path}")
    sl = SplitList(os.path.basename(path))
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2:
                raise DataError(f"{path} line {n}: expected '<image path> <label>', got {line!r}")
            rel, label_text = parts
            try:
                label = int(label_text)
            except ValueError:
                raise DataError(f"{path} line {n}: label {label_text!r} is not an integer") from None
            if not 0 <= label < num_classes:
                raise DataError(f"{path} line {n}: label {label} outside [0, {num_classes}) "
                                f"for this task ({num_classes} classes)")
            sl.add(os.path.join(folder, rel), label, f"{path} line {n}")
    return sl


def parse_vtab(cfg_data) -> ParsedData:
    task = resolve_vtab_task(cfg_data.name, cfg_data.root)
    num_classes, group = VTAB_TASKS[task]
    stems = dict(DEFAULT_SPLITS)
    if cfg_data.final:
        stems["train"] = FINAL_TRAIN_SPLIT
    for split in stems:
        override = getattr(cfg_data, f"{split}_split")
        if override:
            stems[split] = override
    files = {s: _list_file(stem) for s, stem in stems.items()}
    folder = _task_folder(cfg_data.root, task, files["train"])
    splits = {s: read_split_list(os.path.join(folder, f), folder, num_classes) for s, f in files.items()}
    notes = []
    if files["val"] != files["train"] and set(splits["val"].paths) <= set(splits["train"].paths):
        notes.append(f"val ({files['val']}) is inside train ({files['train']}): "
                     f"val accuracy is not a held-out score{' (final run)' if cfg_data.final else ''}")
    return ParsedData(
        format="vtab", name=task, root=folder, class_names=[str(i) for i in range(num_classes)],
        splits=splits, split_names={s: os.path.splitext(f)[0] for s, f in files.items()},
        source=f"VTAB-1k {task} ({group}), image lists at {folder}",
        train_augmented=False, eval_kind=cfg_data.vtab_resize, cache_root=folder, notes=notes)
