"""Parsing ``gapt sweep``'s KEY=VALUE overrides and building the grid of trials.

The preset grids (SPEC §6's learning rates, VPT's lr x weight decay), the short names that make
folder names (``lr0.5_wd0``), splitting ``KEY=a,b,c`` into fixed and swept keys, the cartesian
product in grid order, and each grid point's folder name.
"""
from __future__ import annotations

import itertools
import re
from typing import Any, Dict, List, Sequence, Tuple

import yaml

from .. import config as C

# SPEC §6 grids (values as strings: they are parsed like command-line overrides).
SPEC_LR = ["0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0"]
VPT_LR = ["50", "25", "10", "5", "2.5", "1", "0.5", "0.25", "0.1", "0.05"]
VPT_WD = ["0.01", "0.001", "0.0001", "0"]
GRIDS: Dict[str, Dict[str, List[str]]] = {
    "spec": {"train.lr": SPEC_LR},
    "vpt": {"train.lr": VPT_LR, "train.weight_decay": VPT_WD},
    "none": {},
}

# Short names for folder names: lr0.5_wd0, np10, gi5; other keys are spelled out (method-gated).
ALIASES = {"train.lr": "lr", "train.weight_decay": "wd", "num_prompts": "np", "gate_init": "gi",
           "train.epochs": "ep", "train.batch_size": "bs", "insert_at_block": "at", "train.seed": "seed",
           "prompt_dropout": "pd"}

# Keys the sweep sets itself.
RESERVED_KEYS = {"out": "out is the sweep's folder (trials under out/trials, finals under out/final)",
                 "data.final": "trials run with data.final=false, finals with data.final=true"}


# -- parsing the grid ---------------------------------------------------------------------------
def split_values(value: str) -> List[str]:
    """``"0.1,0.5,1.0"`` -> ``["0.1", "0.5", "1.0"]``; ``\\,`` keeps a literal comma."""
    parts, cur, i = [], "", 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value) and value[i + 1] == ",":
            cur += ","
            i += 2
            continue
        if ch == ",":
            parts.append(cur)
            cur = ""
        else:
            cur += ch
        i += 1
    parts.append(cur)
    return parts


def _quote_commas(value: str) -> str:
    return value.replace(",", "\\,")


def parse_sweep_overrides(items: Sequence[str]) -> Tuple[List[str], Dict[str, List[str]]]:
    """Split ``KEY=VALUE`` items into fixed overrides and swept keys (``KEY=a,b,c``).

    Keys are checked against the config schema (a typo is an error naming the key); the value
    strings are kept as given and parsed later like ordinary overrides. A later item for the
    same key replaces an earlier one; repeated values in a list are dropped.
    """
    fixed: Dict[str, str] = {}
    swept: Dict[str, List[str]] = {}
    for item in items:
        if "=" not in item:
            raise C.ConfigError(f"override '{item}' is not KEY=VALUE (a swept key is KEY=a,b,c)")
        key, value = item.split("=", 1)
        key = key.strip()
        C.parse_overrides([f"{key}="])  # unknown key -> ConfigError with a suggestion
        values = split_values(value)
        if key == "data.final" or (key == "out" and len(values) > 1):
            raise C.ConfigError(f"config key '{key}' cannot be swept or set here: {RESERVED_KEYS[key]}")
        fixed.pop(key, None)
        swept.pop(key, None)
        if len(values) == 1:
            fixed[key] = values[0]
            continue
        if any(v.strip() == "" for v in values):
            raise C.ConfigError(f"empty value in the list for config key '{key}': {value!r}")
        unique, seen = [], set()
        for v in values:
            marker = _parsed_marker(v)
            if marker not in seen:
                seen.add(marker)
                unique.append(v.strip())
        if len(unique) == 1:
            fixed[key] = unique[0]
        else:
            swept[key] = unique
    return [f"{k}={v}" for k, v in fixed.items()], swept


def _parsed_marker(value: str) -> str:
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
        parsed = float(parsed)
    return repr(parsed)


def build_grid(grid: str, fixed: Sequence[str], swept: Dict[str, List[str]]) -> Dict[str, List[str]]:
    """The swept keys in grid order: the preset's keys (unless the user set them), then the user's."""
    if grid not in GRIDS:
        raise C.ConfigError(f"unknown grid {grid!r}; choose one of {sorted(GRIDS)}")
    fixed_keys = {item.split("=", 1)[0] for item in fixed}
    out: Dict[str, List[str]] = {}
    for key, values in GRIDS[grid].items():
        if key in swept:
            out[key] = swept[key]
        elif key not in fixed_keys:
            out[key] = list(values)
    for key, values in swept.items():
        out.setdefault(key, values)
    return out


def grid_points(grid: Dict[str, List[str]]) -> List[Dict[str, str]]:
    """Cartesian product in grid order (the last key varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


def point_name(point: Dict[str, str], long: bool = False) -> str:
    if not point:
        return "default"
    parts = []
    for key, value in point.items():
        if key in ALIASES and not long:
            parts.append(f"{ALIASES[key]}{_safe(value)}")
        else:
            parts.append(f"{_safe(key if long else key.rsplit('.', 1)[-1])}-{_safe(value)}")
    return "_".join(parts)


def point_names(points: List[Dict[str, str]]) -> List[str]:
    names = [point_name(p) for p in points]
    if len(set(names)) < len(names):
        names = [point_name(p, long=True) for p in points]
    if len(set(names)) < len(names):  # values that differ only in characters a folder name cannot hold
        names = [f"{i:03d}_{n}" for i, n in enumerate(names)]
    return names


def _yaml_value(value: str) -> Any:
    try:
        return yaml.safe_load(value) if value.strip() != "" else ""
    except yaml.YAMLError:
        return value
