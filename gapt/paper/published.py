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
- ``+prototype``, ``+spt`` or ``+vipamin`` appended when prompts are initialised from data.

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

from ..tasks import ADE20K_METRICS, FGVC_TASKS, VTAB_GROUP_OF, VTAB_GROUPS, VTAB_TASKS  # noqa: F401 (re-exported)

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
    >>> method_key("vpt-shallow", False, "vipamin")
    'vpt-shallow+vipamin'
    >>> method_key("vpt-at-block", False, "random", insert_at_block=4)
    'vpt@4'
    """
    key = str(method)
    if key == "vpt-at-block" and insert_at_block is not None:
        key = f"vpt@{int(insert_at_block)}"
    if learn_temperature:
        key += "+temperature"
    if prompt_init in ("prototype", "spt", "vipamin"):  # a data-driven init is a method of its own (SPT, VIPAMIN)
        key += f"+{prompt_init}"
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


# ----------------------------------------------------------------------------- Tables 1-8
# SPEC §8: every table of the paper as printed, one PaperRow per printed row. A row is what a
# run must have been to sit beside it: backbone, method key (as above), gate type and the
# run's ``num_prompts`` (per block for vpt-deep; None where the paper picks it per task).
from dataclasses import dataclass  # noqa: E402


@dataclass(frozen=True)
class PaperRow:
    backbone: str
    method: str                      # a method key: vpt-shallow | vpt-deep | gated+temperature | gated
    values: Dict[str, float]         # column -> printed number
    num_prompts: Optional[int] = None
    gate_type: str = "soft"
    label: str = ""                  # the paper's row name
    total_params: Optional[float] = None  # the "total params" column (x the backbone), where printed


@dataclass(frozen=True)
class PaperTable:
    name: str                        # table1 .. table8
    title: str
    benchmark: str                   # fgvc | vtab | ade20k | none (Table 5 holds settings, not results)
    columns: Tuple[str, ...]         # printed result columns, in order
    rows: Tuple[PaperRow, ...]
    tasks: Tuple[str, ...] = ()      # the datasets runs are made on (a column may be a mean of them)
    notes: Tuple[str, ...] = ()

    def row(self, backbone: str, method: str, num_prompts: Optional[int] = None,
            gate_type: str = "soft") -> Optional[PaperRow]:
        for r in self.rows:
            if (r.backbone, r.method, r.gate_type) == (backbone, method, gate_type) and \
                    (r.num_prompts is None or num_prompts is None or r.num_prompts == num_prompts):
                return r
        return None


def _rows(backbone: str, columns, entries) -> Tuple[PaperRow, ...]:
    return tuple(PaperRow(backbone, method, _row(columns, values), num_prompts=n, gate_type=gt, label=label,
                          total_params=tp)
                 for label, method, n, gt, values, tp in entries)


_ADE_PAPER_COLUMNS = ("miou", "miou_ms")
_MAE, _MOCO = "mae_vitb16", "mocov3_vitb16"
_SH, _DP, _OURS = "VPT-shallow", "VPT-deep", "Ours"

TABLES: Dict[str, PaperTable] = {}
TABLES["table1"] = PaperTable(
    "table1", "FGVC, ViT-B/16, 100 prompts (VPT-deep: 10 per block), test top-1 %", "fgvc", _FGVC_COLUMNS,
    tuple(PaperRow(bb, m, PAPER["fgvc"][(bb, m)], num_prompts=n, label=label, total_params=1.02)
          for bb in PAPER_BACKBONES
          for label, m, n in ((_SH, "vpt-shallow", 100), (_DP, "vpt-deep", 10), (_OURS, "gated+temperature", 100))),
    tasks=FGVC_TASKS, notes=("total params: 1.02x for every row (backbone + prompts + heads of the 5 tasks, / backbone)",))
TABLES["table2"] = PaperTable(
    "table2", "VTAB-1k, ViT-B/16, test top-1 % (group means and the mean of the 19 tasks)", "vtab", _VTAB_COLUMNS,
    tuple(PaperRow(bb, m, PAPER["vtab"][(bb, m)], num_prompts=None, label=label,
                   total_params={"vpt-shallow": 1.01, "vpt-deep": 1.04, "gated+temperature": 1.01}[m]
                   if bb == _MAE else None)
          for bb in PAPER_BACKBONES
          for label, m in ((_SH, "vpt-shallow"), (_DP, "vpt-deep"), (_OURS, "gated+temperature"))),
    tasks=VTAB_TASKS, notes=("total params printed for the MAE rows only: 1.01x / 1.04x / 1.01x",
                             "prompts per task: Table 5 for Ours; the paper gives no per-task settings for VPT"))
TABLES["table3"] = PaperTable(
    "table3", "ADE20K, SETR-PUP, 100 prompts, mIoU % single-scale / multi-scale", "ade20k", _ADE_PAPER_COLUMNS,
    tuple(PaperRow(bb, m, PAPER["ade20k"][(bb, m)], num_prompts=n, label=label)
          for bb in PAPER_BACKBONES
          for label, m, n in ((_SH, "vpt-shallow", 100), (_DP, "vpt-deep", None), (_OURS, "gated", 100))),
    tasks=("ade20k",), notes=("the paper's segmentation row is plain gated prompts (no temperature)",
                              "the paper does not say how many prompts per block its ADE20K VPT-deep had"))
TABLES["table4"] = PaperTable(
    "table4", "Gate ablation, MAE ViT-B/16, 100 prompts, test top-1 %", "fgvc", ("cub", "flowers"),
    _rows(_MAE, ("cub", "flowers"), (
        (_SH, "vpt-shallow", 100, "soft", (42.15, 69.15), None),
        ("Ours w/ hard gates (Gumbel-Sigmoid)", "gated+temperature", 100, "hard", (65.46, 76.55), None),
        (_OURS, "gated+temperature", 100, "soft", (70.56, 78.55), None))),
    tasks=("cub", "flowers"), notes=("hard gates as SPEC §9 defines them (gapt's definition; the paper gives none)",))
# Table 5: the selected hyper-parameters (batch, prompts, lr, gate_init) per task and backbone.
TABLE5: Dict[str, Dict[str, Tuple[int, int, float, float]]] = {_MAE: {}, _MOCO: {}}
for _task, _mae, _moco in (
        ("caltech101", (128, 1, 0.5, 5), (128, 10, 2.5, 4)),
        ("cifar", (128, 1, 0.25, 5), (128, 10, 1, 15)),
        ("clevr_dist", (128, 1, 0.1, 15), (128, 5, 1, 10)),
        ("clevr_count", (128, 1, 0.05, 15), (128, 5, 0.5, 5)),
        ("diabetic_retinopathy", (128, 5, 0.05, 10), (128, 5, 0.5, 5)),
        ("dmlab", (128, 1, 0.1, 5), (128, 1, 1, 5)),
        ("dsprites_ori", (128, 1, 0.05, 5), (128, 5, 0.5, 5)),
        ("dsprites_loc", (128, 1, 0.1, 5), (128, 5, 0.5, 5)),
        ("dtd", (128, 1, 0.25, 1), (128, 10, 1, 5)),
        ("eurosat", (128, 5, 0.1, 1), (128, 10, 1, 5)),
        ("kitti", (128, 5, 0.1, 7), (128, 5, 1, 5)),
        ("oxford_flowers102", (128, 1, 0.25, 5), (128, 5, 1, 7)),
        ("oxford_iiit_pet", (128, 1, 0.5, 10), (64, 100, 1, 1)),
        ("patch_camelyon", (128, 1, 0.05, 5), (128, 1, 1, 10)),
        ("resisc45", (128, 10, 0.25, 5), (64, 100, 1, 7)),
        ("smallnorb_azi", (128, 1, 0.1, 20), (128, 10, 0.5, 3)),
        ("smallnorb_ele", (128, 1, 0.05, 10), (128, 5, 0.5, 4)),
        ("sun397", (128, 1, 0.5, 10), (128, 1, 1, 4)),
        ("svhn", (128, 1, 0.1, 10), (128, 5, 1, 10)),
        ("cub", (64, 100, 0.1, 5), (64, 100, 1, 5)),
        ("flowers", (64, 100, 0.1, 15), (64, 100, 1, 10)),
        ("cars", (64, 100, 0.25, 5), (64, 100, 0.5, 5)),
        ("dogs", (64, 100, 0.5, 15), (64, 100, 0.5, 10)),
        ("nabirds", (64, 100, 0.5, 5), (64, 100, 1, 5)),
        ("ade20k", (16, 100, 0.001, 10), (16, 100, 0.001, 10))):
    TABLE5[_MAE][_task] = _mae
    TABLE5[_MOCO][_task] = _moco
TABLES["table5"] = PaperTable(
    "table5", "Selected hyper-parameters of Ours: batch, prompts, lr, gate_init (SGD, wd 0, dropout 0.1, seed 42)",
    "none", ("batch", "prompts", "lr", "gate_init"),
    tuple(PaperRow(bb, "gated+temperature", {"task": t, **dict(zip(("batch", "prompts", "lr", "gate_init"), v))},
                   num_prompts=v[1], label=t)
          for bb in (_MAE, _MOCO) for t, v in TABLE5[bb].items()))
TABLES["table6"] = PaperTable(
    "table6", "ADE20K, 24 prompts (VPT-deep: 2 per block), mIoU % single-scale / multi-scale", "ade20k",
    _ADE_PAPER_COLUMNS,
    _rows(_MAE, _ADE_PAPER_COLUMNS, ((_SH, "vpt-shallow", 24, "soft", (34.77, 35.93), None),
                                     (_DP, "vpt-deep", 2, "soft", (37.03, 38.25), None),
                                     (_OURS, "gated", 24, "soft", (38.13, 39.23), None)))
    + _rows(_MOCO, _ADE_PAPER_COLUMNS, ((_SH, "vpt-shallow", 24, "soft", (34.75, 36.34), None),
                                        (_DP, "vpt-deep", 2, "soft", (35.96, 37.47), None),
                                        (_OURS, "gated", 24, "soft", (37.02, 38.57), None))),
    tasks=("ade20k",), notes=("the only text copy prints this table's cells out of order; SPEC §8 gives the "
                              "consistent reading used here",))
TABLES["table7"] = PaperTable(
    "table7", "FGVC on MAE ViT-B/16 with fewer prompts (VPT-deep: total / 12 per block), test top-1 %", "fgvc",
    _FGVC_COLUMNS,
    _rows(_MAE, _FGVC_COLUMNS, (
        ("VPT-deep, 24 prompts", "vpt-deep", 2, "soft", (59.68, 67.51, 57.68, 77.91, 54.65, 63.49), None),
        ("Ours, 24 prompts", "gated+temperature", 24, "soft", (65.26, 73.80, 66.09, 75.72, 62.10, 68.59), None),
        ("VPT-deep, 48 prompts", "vpt-deep", 4, "soft", (66.43, 71.31, 64.06, 78.89, 60.62, 68.26), None),
        ("Ours, 48 prompts", "gated+temperature", 48, "soft", (69.00, 74.71, 70.29, 76.77, 63.73, 70.90), None),
        ("VPT-deep, 96 prompts", "vpt-deep", 8, "soft", (70.85, 76.29, 67.63, 78.38, 62.99, 71.23), None),
        ("Ours, 96 prompts", "gated+temperature", 96, "soft", (71.40, 75.96, 72.16, 77.81, 66.25, 72.72), None))),
    tasks=FGVC_TASKS, notes=("same hyper-parameters as Table 1",
                             "Fig. 7's text disagrees with this table for VPT-deep at 48 prompts on Cars "
                             "(60.9 in the text, 64.06 here); see FIG7_TEXT"))
TABLES["table8"] = PaperTable(
    "table8", "Other ViT sizes, 48 prompts (VPT-deep: 48 / depth per block: 2 on ViT-L/16, 4 on ViT-S/16), "
              "test top-1 %", "fgvc", ("cub", "flowers"),
    _rows("mae_vitl16", ("cub", "flowers"), (
        (_SH, "vpt-shallow", 48, "soft", (39.26, 62.77), None),
        (_DP, "vpt-deep", 2, "soft", (70.54, 65.44), None),  # 24 blocks x 2 = 48
        (_OURS, "gated+temperature", 48, "soft", (72.99, 74.71), None)))
    + _rows("mocov3_vits16", ("cub", "flowers"), (
        (_SH, "vpt-shallow", 48, "soft", (68.62, 84.65), None),
        (_DP, "vpt-deep", 4, "soft", (73.18, 89.53), None),  # 12 blocks x 4 = 48
        (_OURS, "gated+temperature", 48, "soft", (73.30, 91.14), None))),
    tasks=("cub", "flowers"), notes=("(a) MAE ViT-L/16, (b) MoCo v3 ViT-S/16, the official checkpoints",))

# Fig. 7 (MAE, Stanford Cars): the numbers its text states, kept beside Table 7's (they disagree).
FIG7_TEXT: Dict[Tuple[str, int], float] = {("gated+temperature", 24): 66.1, ("vpt-deep", 48): 60.9}

# Where a run group meets its paper row, in the order searched: Table 1, the hard-gate row (Table 4), the
# prompt-budget rows (Table 7, FGVC on MAE), the other sizes (Table 8); Tables 2, 3 and 6.
_SEARCH = {"fgvc": ("table1", "table4", "table7", "table8"), "vtab": ("table2",), "ade20k": ("table3", "table6")}


def find_paper_row(benchmark: str, backbone: str, method: str, num_prompts: Optional[int],
                   gate_type: str = "soft") -> Tuple[Optional[str], Optional[PaperRow]]:
    """(table name, row) a run group sits beside, or (None, None): same backbone, method key, gate
    type and prompt count (``num_prompts`` per block for vpt-deep), never another size or budget."""
    for name in _SEARCH.get(benchmark, ()):
        table = TABLES[name]
        for r in table.rows:
            if (r.backbone, r.method, r.gate_type) != (backbone, method, gate_type):
                continue
            if r.num_prompts is not None and r.num_prompts != num_prompts:
                continue
            return name, r
    return None, None
