"""The benchmarks' tasks in the order of the paper's columns (SPEC §5, §7): plain data.

Like ``gapt.config`` and ``gapt.method`` this sits outside the layers: a sweep over a whole
benchmark, the report and the published numbers all read the same order from here.
"""
from __future__ import annotations

from typing import Dict, Tuple

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
