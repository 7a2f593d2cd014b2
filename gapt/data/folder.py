"""User datasets: an image folder (one sub-folder per class) or CSV lists of ``path,label``.

Splits that are not given (no ``val/`` folder, no ``data.csv_val`` ...) are stratified,
seeded carve-outs of ``data.val_fraction`` of the train pool each. Transforms are FGVC's
(random crop + flip on train, resize + center crop on eval).
"""
from __future__ import annotations

import csv
import logging
import math
import os
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .bundle import SPLITS, ParsedData, SplitList
from .errors import DataError

log = logging.getLogger("gapt.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


# ------------------------------------------------------------------------------------------
# stratified carve-out
# ------------------------------------------------------------------------------------------

def stratified_carve(labels: Sequence[int], fractions: Dict[str, float],
                     seed: int) -> Tuple[List[int], Dict[str, List[int]]]:
    """Split indices into (kept, {name: carved}) per class, ``fractions[name]`` of each class.

    Every class keeps at least one item; each carve-out gets at least one item of a class
    whenever that still leaves one behind. Seeded, so the same seed gives the same split.
    """
    rng = np.random.default_rng(abs(int(seed)))
    by_class: Dict[int, List[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[int(y)].append(i)
    carved: Dict[str, List[int]] = {name: [] for name in fractions}
    kept: List[int] = []
    for c in sorted(by_class):
        idx = rng.permutation(np.asarray(by_class[c]))
        n, start = len(idx), 0
        for name, frac in fractions.items():
            remaining = n - start
            k = int(math.floor(frac * n + 0.5))
            if k < 1 and remaining >= 2:
                k = 1
            k = max(0, min(k, remaining - 1))
            carved[name] += idx[start:start + k].tolist()
            start += k
        kept += idx[start:].tolist()
    return sorted(kept), {name: sorted(v) for name, v in carved.items()}


def _fill_missing_splits(splits: Dict[str, Optional[SplitList]], cfg_data, seed: int,
                         notes: List[str]) -> Dict[str, str]:
    """Carve missing val/test out of train in place; returns the info text of each split."""
    names = {s: splits[s].source for s in SPLITS if splits[s] is not None}
    missing = [s for s in ("val", "test") if splits[s] is None]
    if missing:
        frac = float(cfg_data.val_fraction)
        train = splits["train"]
        kept, carved = stratified_carve(train.labels, {s: frac for s in missing}, seed)
        for s in missing:
            text = f"carved from {train.source} ({frac:.0%} per class, stratified, seed {seed})"
            splits[s] = train.subset(carved[s], text)
            names[s] = text
        splits["train"] = train.subset(kept)
        names["train"] = f"{train.source} minus the carved-out {' and '.join(missing)}"
        notes.append(f"{' and '.join(missing)} carved out of {train.source}")
    if cfg_data.final:
        splits["train"] = splits["train"] + splits["val"]
        names["train"] = f"{names['train']} + {names['val']}"
        notes.append("final run: trains on train + val; val accuracy is not a held-out score")
    return names


# ------------------------------------------------------------------------------------------
# image folder
# ------------------------------------------------------------------------------------------

def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _class_dirs(folder: str) -> List[str]:
    return sorted(d for d in os.listdir(folder)
                  if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))


def scan_image_folder(folder: str) -> Dict[str, List[str]]:
    """{class name: sorted image paths} for each non-hidden sub-folder (searched recursively)."""
    out: Dict[str, List[str]] = {}
    for cls in _class_dirs(folder):
        files = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(folder, cls), followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [os.path.join(dirpath, f) for f in filenames if _is_image(f)]
        out[cls] = sorted(files)
    return out


def _split_folders(cfg_data) -> Dict[str, str]:
    return {s: getattr(cfg_data, f"{s}_split") or s for s in SPLITS}


def parse_folder(cfg_data, seed: int) -> ParsedData:
    root = cfg_data.root
    if not root:
        raise DataError("data.root is empty; set it to the image folder (one sub-folder per class)")
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root} (data.root)")
    dirs = _split_folders(cfg_data)
    train_dir = os.path.join(root, dirs["train"])
    split_layout = os.path.isdir(train_dir) and bool(_class_dirs(train_dir))
    if cfg_data.train_split and not split_layout:
        raise DataError(f"image folder not found: {train_dir} (data.train_split={cfg_data.train_split!r}), "
                        f"or it has no class sub-folders")
    scans: Dict[str, Dict[str, List[str]]] = {}
    if split_layout:
        for s in SPLITS:
            d = os.path.join(root, dirs[s])
            if os.path.isdir(d):
                scans[s] = scan_image_folder(d)
            elif getattr(cfg_data, f"{s}_split"):
                raise DataError(f"image folder not found: {d} (data.{s}_split={dirs[s]!r})")
    else:
        scans["train"] = scan_image_folder(root)

    class_names = sorted({c for scan in scans.values() for c in scan})
    if not class_names:
        raise DataError(f"no class sub-folders in {root}: expected {root}/<class_name>/<image files>")
    notes: List[str] = []
    train_classes = scans["train"]
    empty = [c for c in class_names if not train_classes.get(c)]
    if empty:
        msg = f"{len(empty)} class(es) have no training images: {', '.join(empty[:10])}"
        log.warning("%s: %s", root, msg)
        notes.append(msg)
    index = {c: i for i, c in enumerate(class_names)}
    splits: Dict[str, Optional[SplitList]] = {s: None for s in SPLITS}
    for s, scan in scans.items():
        base = os.path.join(root, dirs[s]) if split_layout else root
        sl = SplitList(f"{dirs[s]}/" if split_layout else f"{os.path.basename(os.path.normpath(root))}/")
        for cls, files in scan.items():
            for p in files:
                sl.add(p, index[cls], f"class folder {os.path.join(base, cls)}")
        splits[s] = sl
    names = _fill_missing_splits(splits, cfg_data, seed, notes)
    layout = "train/val/test sub-folders" if split_layout else "one sub-folder per class"
    return ParsedData(
        format="folder", name=cfg_data.name or os.path.basename(os.path.normpath(root)), root=root,
        class_names=class_names, splits=splits, split_names=names,
        source=f"image folder {root} ({layout})", train_augmented=True, eval_kind="center_crop",
        cache_root=root, notes=notes)


# ------------------------------------------------------------------------------------------
# CSV lists
# ------------------------------------------------------------------------------------------

_PATH_HEADERS = ("path", "filepath", "file", "filename", "image", "image_path", "img")
_LABEL_HEADERS = ("label", "class", "class_name", "target", "category")


def _is_int(text: str) -> bool:
    return text.lstrip("+-").isdigit()


def _resolve_csv(name: str, root: str, key: str) -> str:
    if os.path.isabs(name):
        candidates = [name]
    else:
        candidates = ([os.path.join(root, name)] if root else []) + [os.path.abspath(name)]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise DataError(f"missing split file {candidates[0]} (data.{key}={name!r})")


def read_csv_list(path: str) -> List[Tuple[str, str, int]]:
    """[(image path as written, label text, line)] with an optional header skipped."""
    rows: List[Tuple[str, str, int]] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        path_col, label_col, first = 0, 1, True
        for row in reader:
            cells = [c.strip() for c in row]
            if not any(cells):
                continue
            line = reader.line_num
            if first:
                first = False
                lowered = [c.lower() for c in cells]
                if any(c in _PATH_HEADERS for c in lowered) and any(c in _LABEL_HEADERS for c in lowered):
                    path_col = next((i for i, c in enumerate(lowered) if c in _PATH_HEADERS), 0)
                    label_col = next((i for i, c in enumerate(lowered) if c in _LABEL_HEADERS), 1)
                    continue
            if len(cells) <= max(path_col, label_col):
                raise DataError(f"{path} line {line}: expected 'path,label', got {','.join(row)!r}")
            image, label = cells[path_col], cells[label_col]
            if not image or not label:
                raise DataError(f"{path} line {line}: empty {'path' if not image else 'label'} in {','.join(row)!r}")
            rows.append((image, label, line))
    return rows


def label_gaps(present, num_classes: int) -> str:
    """Labels in [0, num_classes) that never occur, as runs: "3..6, 9" ("" if none)."""
    missing = [i for i in range(num_classes) if i not in present]
    runs: List[List[int]] = []
    for i in missing:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)


def parse_csv(cfg_data, seed: int) -> ParsedData:
    if not cfg_data.csv_train:
        raise DataError("data.format=csv needs data.csv_train (a file of 'path,label' lines)")
    root = cfg_data.root
    if root and not os.path.isdir(root):
        raise DataError(f"image folder not found: {root} (data.root)")
    files = {"train": _resolve_csv(cfg_data.csv_train, root, "csv_train")}
    for s in ("val", "test"):
        name = getattr(cfg_data, f"csv_{s}")
        if name:
            files[s] = _resolve_csv(name, root, f"csv_{s}")
    base = root or os.path.dirname(files["train"])
    raw = {s: read_csv_list(p) for s, p in files.items()}

    all_labels = [label for rows in raw.values() for _, label, _ in rows]
    integer = all(_is_int(label) for label in all_labels)
    notes: List[str] = []
    if integer:
        given = int(getattr(cfg_data, "num_classes", 0) or 0)
        for s, rows in raw.items():
            for _, label, line in rows:
                if int(label) < 0 or (given and int(label) >= given):
                    bound = f"data.num_classes={given}" if given else "num_classes"
                    raise DataError(f"{files[s]} line {line}: label {label} outside [0, {bound})")
        num_classes = given or max((int(x) for x in all_labels), default=-1) + 1
        class_names = [str(i) for i in range(num_classes)]
        to_label = lambda text: int(text)  # noqa: E731
        gaps = label_gaps({int(x) for x in all_labels}, num_classes)
        if gaps:  # e.g. one mistyped label 7 in a 3-class list would add 4 classes nobody has
            msg = (f"labels {gaps} never occur in {', '.join(os.path.basename(p) for p in files.values())}, yet "
                   f"count as classes ({num_classes} in all); set data.num_classes to make labels outside it "
                   f"an error")
            log.warning("%s", msg)
            notes.append(msg)
    else:
        class_names = sorted(set(all_labels))
        index = {c: i for i, c in enumerate(class_names)}
        to_label = index.__getitem__

    splits: Dict[str, Optional[SplitList]] = {s: None for s in SPLITS}
    for s, rows in raw.items():
        sl = SplitList(os.path.basename(files[s]))
        for image, label, line in rows:
            p = image if os.path.isabs(image) else os.path.join(base, image)
            sl.add(p, to_label(label), f"{files[s]} line {line}")
        splits[s] = sl
    if not integer:
        notes.append("labels are class names, indexed in sorted order")
    names = _fill_missing_splits(splits, cfg_data, seed, notes)
    return ParsedData(
        format="csv", name=cfg_data.name or os.path.splitext(os.path.basename(files["train"]))[0], root=base,
        class_names=class_names, splits=splits, split_names=names,
        source=f"CSV lists {', '.join(os.path.basename(p) for p in files.values())} (images under {base})",
        train_augmented=True, eval_kind="center_crop", cache_root=base, notes=notes)
