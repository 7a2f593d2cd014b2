"""Published numbers of the GaPT paper (ICML 2023, ViT-B/16), the anchors a report compares with.

The tables below are SPEC section 7 typed as data, digit for digit. Nothing here is
computed: the FGVC "mean" and the VTAB "mean" are the paper's printed means.

Method keys
-----------
A run is filed under a *method key* built by :func:`method_key` from its config:

- the method name itself: ``linear``, ``full``, ``vpt-shallow``, ``vpt-deep``, ``gated``;
  ``vpt-at-block`` becomes ``vpt@k`` when the insertion block k is known;
- ``+temperature`` appended when the per-block temperature is learned (any method, so
  the paper's "gated + temperature" row is ``gated+temperature``);
- ``+prototype`` appended when prompts are initialised from prototypes.

The paper rows are keyed with the same rule, so a run meets the paper's number only
when it used the same recipe: FGVC and VTAB-1k report ``vpt-shallow``, ``vpt-deep`` and
``gated+temperature``; ADE20K reports ``vpt-shallow``, ``vpt-deep`` and ``gated`` (the
paper's segmentation row is named plainly "gated", and it is keyed exactly so). A key
with ``+prototype`` never has a paper number.

Backbones are keyed ``mae_vitb16`` and ``mocov3_vitb16`` (gapt's backbone names); a run
whose backbone is named otherwise (e.g. a timm hub name) gets no paper number.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

FGVC_TASKS: Tuple[str, ...] = ("cub", "flowers", "cars", "dogs", "nabirds")

VTAB_GROUPS: Dict[str, Tuple[str, ...]] = {
    "natural": ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet",
                "svhn", "sun397"),
    "specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "structured": ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc",
                   "dsprites_ori", "smallnorb_azi", "smallnorb_ele"),
}
VTAB_TASKS: Tuple[str, ...] = tuple(t for tasks in VTAB_GROUPS.values() for t in tasks)
VTAB_GROUP_OF: Dict[str, str] = {t: g for g, tasks in VTAB_GROUPS.items() for t in tasks}

ADE20K_METRICS: Tuple[str, ...] = ("mIoU", "mIoU_ms")

PAPER_BACKBONES: Tuple[str, ...] = ("mae_vitb16", "mocov3_vitb16")


def _row(columns, values):
    assert len(columns) == len(values)
    return dict(zip(columns, values))


_FGVC_COLUMNS = FGVC_TASKS + ("mean",)
_VTAB_COLUMNS = ("natural", "specialized", "structured", "mean")
_ADE_COLUMNS = ("miou", "miou_ms")

# PAPER[benchmark][(backbone, method_key)] = {column: number}; columns are lower case.
PAPER: Dict[str, Dict[Tuple[str, str], Dict[str, float]]] = {
    "fgvc": {
        # CUB / Flowers / Cars / Dogs / NABirds / mean
        ("mae_vitb16", "vpt-shallow"): _row(_FGVC_COLUMNS, (42.15, 69.15, 43.38, 77.07, 57.43, 57.84)),
        ("mae_vitb16", "vpt-deep"): _row(_FGVC_COLUMNS, (68.33, 80.05, 67.67, 78.83, 65.22, 72.02)),
        ("mae_vitb16", "gated+temperature"): _row(_FGVC_COLUMNS, (70.56, 78.55, 71.70, 78.90, 67.26, 73.39)),
        ("mocov3_vitb16", "vpt-shallow"): _row(_FGVC_COLUMNS, (79.05, 90.47, 71.91, 81.97, 72.92, 79.26)),
        ("mocov3_vitb16", "vpt-deep"): _row(_FGVC_COLUMNS, (82.67, 94.41, 79.18, 83.33, 75.99, 83.12)),
        ("mocov3_vitb16", "gated+temperature"): _row(_FGVC_COLUMNS, (82.86, 93.71, 79.02, 83.37, 76.02, 83.00)),
    },
    "vtab": {
        # Natural / Specialized / Structured / mean of 19
        ("mae_vitb16", "vpt-shallow"): _row(_VTAB_COLUMNS, (39.96, 69.65, 27.50, 40.96)),
        ("mae_vitb16", "vpt-deep"): _row(_VTAB_COLUMNS, (36.02, 60.61, 26.57, 37.22)),
        ("mae_vitb16", "gated+temperature"): _row(_VTAB_COLUMNS, (47.61, 76.86, 36.80, 49.22)),
        ("mocov3_vitb16", "vpt-shallow"): _row(_VTAB_COLUMNS, (67.34, 82.26, 37.55, 57.94)),
        ("mocov3_vitb16", "vpt-deep"): _row(_VTAB_COLUMNS, (70.27, 83.04, 42.38, 61.22)),
        ("mocov3_vitb16", "gated+temperature"): _row(_VTAB_COLUMNS, (74.84, 83.38, 49.10, 65.80)),
    },
    "ade20k": {
        # mIoU single-scale / multi-scale
        ("mae_vitb16", "vpt-shallow"): _row(_ADE_COLUMNS, (34.20, 35.23)),
        ("mae_vitb16", "vpt-deep"): _row(_ADE_COLUMNS, (37.76, 38.80)),
        ("mae_vitb16", "gated"): _row(_ADE_COLUMNS, (38.44, 39.81)),
        ("mocov3_vitb16", "vpt-shallow"): _row(_ADE_COLUMNS, (34.55, 36.18)),
        ("mocov3_vitb16", "vpt-deep"): _row(_ADE_COLUMNS, (35.50, 37.15)),
        ("mocov3_vitb16", "gated"): _row(_ADE_COLUMNS, (36.81, 38.55)),
    },
}

# Every column a benchmark knows, including those the paper prints no number for
# (VTAB per-task accuracies): asking for these gives None, anything else is a typo.
VALID_COLUMNS: Dict[str, Tuple[str, ...]] = {
    "fgvc": _FGVC_COLUMNS,
    "vtab": _VTAB_COLUMNS + VTAB_TASKS,
    "ade20k": _ADE_COLUMNS,
}


def method_key(method: str, learn_temperature: bool = False, prompt_init: str = "random",
               insert_at_block: Optional[int] = None) -> str:
    """The key a run is reported under (see the module docstring for the rule).

    >>> method_key("gated", True, "random")
    'gated+temperature'
    >>> method_key("vpt-deep", False, "prototype")
    'vpt-deep+prototype'
    >>> method_key("vpt-at-block", False, "random", insert_at_block=4)
    'vpt@4'
    """
    key = str(method)
    if key == "vpt-at-block" and insert_at_block is not None:
        key = f"vpt@{int(insert_at_block)}"
    if learn_temperature:
        key += "+temperature"
    if prompt_init == "prototype":
        key += "+prototype"
    return key


def paper_number(benchmark: str, backbone: str, method_key: str, column: str) -> Optional[float]:
    """The paper's number, or None where the paper prints none.

    ``column`` (case-insensitive): FGVC ``cub | flowers | cars | dogs | nabirds | mean``;
    VTAB ``natural | specialized | structured | mean`` (mean of the 19 tasks; per-task
    names are accepted and give None, SPEC section 7 has no per-task VTAB numbers);
    ADE20K ``mIoU | mIoU_ms``. Benchmarks without published numbers (folder, csv,
    shapes, ...) give None. A column the benchmark does not know raises ValueError.
    """
    table = PAPER.get(benchmark)
    if table is None:
        return None
    col = str(column).lower()
    if col not in VALID_COLUMNS[benchmark]:
        raise ValueError(f"paper_number: benchmark {benchmark!r} has no column {column!r}; "
                         f"known: {', '.join(VALID_COLUMNS[benchmark])}")
    row = table.get((backbone, method_key))
    if row is None:
        return None
    return row.get(col)
