"""FGVC in VPT's layout: ``train.json`` / ``val.json`` / ``test.json`` of {relative_image_path: class_id}.

Class ids are mapped to 0..C-1 by sorted order of the ids present across the split files
read (VPT maps per split file, which silently mislabels a split missing a class).
``data.name`` picks the class count and the image folder; an empty name reads any
folder in this layout with images under the root and C = the number of ids found.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Tuple

from .bundle import ParsedData, SplitList
from .errors import DataError

log = logging.getLogger("gapt.data")

# name -> (number of classes, image folder relative to the dataset folder)
FGVC_DATASETS: Dict[str, Tuple[int, str]] = {
    "cub": (200, "images"),
    "nabirds": (555, "images"),
    "flowers": (102, "."),
    "dogs": (120, "Images"),
    "cars": (196, "."),
}

_TITLES = {"cub": "CUB-200-2011", "nabirds": "NABirds", "flowers": "Oxford Flowers-102",
           "dogs": "Stanford Dogs", "cars": "Stanford Cars"}

_ALIASES = {"cub200": "cub", "cub_200_2011": "cub", "cub-200-2011": "cub",
            "oxfordflowers": "flowers", "oxford_flowers": "flowers", "oxfordflower": "flowers",
            "flowers102": "flowers", "stanforddogs": "dogs", "stanford_dogs": "dogs",
            "stanfordcars": "cars", "stanford_cars": "cars"}


def resolve_fgvc_name(name: str) -> str:
    """Canonical FGVC name ("" stays "" = generic dataset); DataError listing valid ones."""
    key = (name or "").strip().lower()
    if not key:
        return ""
    key = _ALIASES.get(key, key)
    if key not in FGVC_DATASETS:
        raise DataError(f"unknown FGVC dataset data.name={name!r}; valid names: {', '.join(FGVC_DATASETS)} "
                        f"(or leave data.name empty for another dataset in the same JSON layout)")
    return key


def _lines_in_order(text: str, keys: List[str]) -> List[int]:
    """1-based line of each key, scanning the text once (keys in file order; 0 if not found)."""
    lines, pos, last, line = [], 0, 0, 1
    for key in keys:
        found = -1
        for quoted in (json.dumps(key, ensure_ascii=False), json.dumps(key)):
            found = text.find(quoted, pos)
            if found >= 0:
                break
        if found < 0:
            lines.append(0)
            continue
        line += text.count("\n", last, found)
        last, pos = found, found + len(quoted)
        lines.append(line)
    return lines


def _where(path: str, line: int, key: str) -> str:
    return f"{path} line {line}" if line else f"{path} (key {key!r})"


def _as_int(value):
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def read_split_json(path: str) -> List[Tuple[str, int, int]]:
    """[(relative image path, class id, line)] in file order."""
    if not os.path.isfile(path):
        raise DataError(f"missing split file {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        obj = json.loads(text, object_pairs_hook=OrderedDict)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object {{relative_image_path: class_id}}, "
                        f"got {type(obj).__name__}")
    keys = list(obj.keys())
    entries = []
    for key, line in zip(keys, _lines_in_order(text, keys)):
        cid = _as_int(obj[key])
        if cid is None:
            raise DataError(f"{_where(path, line, key)}: class id {obj[key]!r} of {key!r} is not an integer")
        entries.append((key, cid, line))
    return entries


def _dataset_folder(root: str, name: str, train_file: str) -> str:
    if not root:
        raise DataError("data.root is empty; set it to the dataset folder holding train.json/val.json/test.json")
    if not os.path.isdir(root):
        raise DataError(f"dataset folder not found: {root} (data.root)")
    if not os.path.isfile(os.path.join(root, train_file)) and name:
        nested = os.path.join(root, name)
        if os.path.isfile(os.path.join(nested, train_file)):
            return nested
    return root


def _class_names(ids: List[int], all_entries) -> List[str]:
    """Parent folder of each class's images when that names classes one-to-one, else the id."""
    parents: Dict[int, set] = {i: set() for i in ids}
    for entries in all_entries:
        for key, cid, _ in entries:
            parents[cid].add(os.path.dirname(key.replace("\\", "/")).split("/")[-1])
    names = [next(iter(parents[i])) if len(parents[i]) == 1 else "" for i in ids]
    if all(names) and len(set(names)) == len(names):
        return names
    return [str(i) for i in ids]


def parse_fgvc(cfg_data) -> ParsedData:
    name = resolve_fgvc_name(cfg_data.name)
    stems = {"train": cfg_data.train_split or "train",
             "val": cfg_data.val_split or "val",
             "test": cfg_data.test_split or "test"}
    files = {s: stem if stem.endswith(".json") else stem + ".json" for s, stem in stems.items()}
    folder = _dataset_folder(cfg_data.root, name, files["train"])
    expected, image_dir = FGVC_DATASETS.get(name, (0, "."))
    by_file: Dict[str, List[Tuple[str, int, int]]] = {}
    for fname in files.values():
        path = os.path.join(folder, fname)
        if path not in by_file:
            by_file[path] = read_split_json(path)
    image_root = os.path.normpath(os.path.join(folder, image_dir))
    if not os.path.isdir(image_root):
        raise DataError(f"image folder not found: {image_root} ({_TITLES.get(name, name)} images live under "
                        f"'{image_dir}/' of the dataset folder {folder})")

    ids = sorted({cid for entries in by_file.values() for _, cid, _ in entries})
    if expected and len(ids) > expected:
        extra = ids[expected]
        where = next(_where(p, line, key) for p, entries in by_file.items()
                     for key, cid, line in entries if cid == extra)
        raise DataError(f"{where}: class id {extra} maps to label {expected}, outside [0, {expected}): "
                        f"{_TITLES[name]} has {expected} classes but the split files hold {len(ids)} distinct ids")
    num_classes = expected or len(ids)
    notes: List[str] = []
    if len(ids) < num_classes:
        msg = (f"the split files hold {len(ids)} of {num_classes} class ids; "
               f"labels {len(ids)}..{num_classes - 1} never occur")
        log.warning("%s: %s", name, msg)
        notes.append(msg)
    to_label = {cid: i for i, cid in enumerate(ids)}
    class_names = _class_names(ids, by_file.values())
    class_names += [f"class_{i}" for i in range(len(class_names), num_classes)]

    splits = {}
    for split, fname in files.items():
        path = os.path.join(folder, fname)
        sl = SplitList(fname)
        for key, cid, line in by_file[path]:
            sl.add(os.path.join(image_root, key), to_label[cid], _where(path, line, key))
        splits[split] = sl
    if cfg_data.final:
        notes.append(f"final run: trains on {files['train']} alone (the reference's choice), "
                     f"selects on {files['val']}")
    title = _TITLES.get(name, "FGVC-style dataset")
    return ParsedData(
        format="fgvc", name=name or os.path.basename(os.path.normpath(folder)), root=folder,
        class_names=class_names, splits=splits, split_names=dict(files),
        source=f"{title}, VPT JSON splits at {folder} (images under {image_root})",
        train_augmented=True, eval_kind="center_crop", cache_root=folder, notes=notes)
