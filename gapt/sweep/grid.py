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
# VIPAMIN's (SPEC §12.2(d), run_indiv.sh): base lr {0.05 .. 5.0} x 32 / 256 (its batch 32) x the 9 pairs (k, lambda)
# {2, 8, 32, 128} x {0, 0.5} + (2, 1), lambda outer as its loop. At lambda = 1 the prompt is the orthogonal part
# alone and k is unused: grid_points keeps that point for the first k only (UNUSED_WHEN).
VIPAMIN_LR = ["0.00625", "0.0125", "0.03125", "0.0625", "0.125", "0.3125", "0.625"]
# SPT publishes no grid (per-task recipes unreleased): gapt's AdamW lrs spanning its README's 1e-3 (MoCo) .. 5e-2 (MAE).
SPT_LR = ["0.001", "0.0025", "0.005", "0.01", "0.025", "0.05"]
# DA-VPT (SPEC §12.5(d)): the AdamW lrs of its released configs (1e-4 .. 1e-2); "adamw" adds 5e-2 (SSF's top).
DAVPT_LR = ["0.0001", "0.0005", "0.001", "0.005", "0.01"]
GRIDS: Dict[str, Dict[str, List[str]]] = {
    "spec": {"train.lr": SPEC_LR},
    "vpt": {"train.lr": VPT_LR, "train.weight_decay": VPT_WD},
    "vipamin": {"train.lr": VIPAMIN_LR, "vipamin_lambda": ["0", "0.5", "1"], "vipamin_k": ["2", "8", "32", "128"]},
    "spt": {"train.lr": SPT_LR},
    "davpt": {"train.lr": DAVPT_LR},
    "adamw": {"train.lr": DAVPT_LR + ["0.05"]},
    # VFPT's tune_vtab.py / E2VPT's tune_vtab_PruningRewind_CVK.py: VPT's lrs x batch / 256 at their VTAB-1k
    # batch (VFPT 64, E2VPT 128), x VPT's weight decays (FGVC batches: the presets' own train.lr lists)
    "vfpt": {"train.lr": [f"{float(lr) * 64 / 256:g}" for lr in VPT_LR], "train.weight_decay": VPT_WD},
    "e2vpt": {"train.lr": [f"{float(lr) * 128 / 256:g}" for lr in VPT_LR], "train.weight_decay": VPT_WD},
    "none": {},
}
# key: (other key, value): a point where the other key has that value does not read the key, so only its
# first value in the grid is kept (the others would repeat that run).
UNUSED_WHEN = {"vipamin_k": ("vipamin_lambda", 1.0)}

# Short names for folder names: lr0.5_wd0, np10, gi5; other keys are spelled out (method-gated).
ALIASES = {"train.lr": "lr", "train.weight_decay": "wd", "num_prompts": "np", "gate_init": "gi",
           "train.epochs": "ep", "train.batch_size": "bs", "insert_at_block": "at", "train.seed": "seed",
           "prompt_dropout": "pd", "vipamin_k": "k", "vipamin_lambda": "lam"}

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
    """Cartesian product in grid order (the last key varies fastest), without points that repeat a run (UNUSED_WHEN)."""
    keys = list(grid)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    return [p for p in points if not any(key in p and other in p and p[key] != grid[key][0]
                                         and _yaml_value(p[other]) == value
                                         for key, (other, value) in UNUSED_WHEN.items())]


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
