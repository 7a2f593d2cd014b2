"""`gapt reproduce TABLE`: the runs a paper table needs, run through the sweep executors, then the
table beside the paper's (SPEC §8).

A *plan* is data: a :class:`Plan` holding a list of :class:`RunSpec`, one per cell of the table
(a paper row x a dataset). ``PLANS`` maps a name to a function that returns one::

    PLANS["table4"]() -> Plan(name="table4", specs=[RunSpec(...), ...], table="table4")

Plan functions take no argument and touch nothing (no data, no torch): they only say what to
run. Figures add their own (``PLANS["fig7"] = plan_fig7``) and, where the output is not a table,
their own ``render`` (``Plan.render(plan, results, out_dir) -> [paths]``).

A spec is a preset (``gapt/configs/...``) plus overrides. ``lr_sweep=False``: the settings are
the paper's (Table 5), so it trains ``seeds`` final runs (``data.final=true``, seeds 42, 43, ...)
in ``<out>/<spec.name>/final/seed<S>/``. ``lr_sweep=True`` (rows whose settings the paper does
not give): a ``gapt sweep`` over SPEC §6's learning rates on val, then the finals, in
``<out>/<spec.name>/`` (``trials/``, ``final/``). Either way every run is an ordinary run folder
and a restarted command keeps finished runs, resumes interrupted ones and lists failed ones.

:func:`run_plan` checks every dataset and weights file, then runs the plan; :func:`render_table`
writes ``<table>.md`` and ``<table>.csv``: every cell ours (mean over seeds), paper, difference.
Nothing here imports torch at import time.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import published as P

log = logging.getLogger("gapt.reproduce")

PRESETS = Path(__file__).resolve().parents[1] / "configs"
REPRODUCE_FILE = "reproduce.json"
SEG_RUNNER = "gapt.seg.train:train_seg_multi_scale"

# The folder of each dataset under --data-root (the presets' own folder names).
FGVC_FOLDERS = {"cub": "CUB_200_2011", "nabirds": "nabirds", "flowers": "OxfordFlower", "dogs": "Stanford-dogs",
                "cars": "Stanford-cars"}
ADE20K_FOLDER = "ADEChallengeData2016"


class ReproduceError(RuntimeError):
    """A plan that cannot start (unknown table, missing dataset or weights); the message says which."""


@dataclass
class RunSpec:
    """One cell of a table: a paper row trained on one dataset."""
    name: str                      # folder under the plan's out dir, e.g. "mae_vitb16/ours/cub"
    row: str                       # the paper row's label, e.g. "Ours" (the rendered table's row)
    backbone: str                  # the paper's backbone for this row (weights are looked up by it)
    method: str                    # the row's method key (paper.method_key), e.g. "gated+temperature"
    benchmark: str                 # fgvc | vtab | ade20k (which dataset folder --data-root must hold)
    task: str                      # the dataset: a column of the table, or a part of a mean column
    preset: str                    # a preset under gapt/configs/, e.g. "fgvc/mae_vitb16/cub.yaml"
    overrides: List[str] = field(default_factory=list)
    lr_sweep: bool = False         # search SPEC §6's lr grid on val first (no published settings)
    gate_type: str = "soft"
    num_prompts: Optional[int] = None  # as the run's num_prompts (per block for vpt-deep)
    runner: str = ""               # "module:function" training a config ("" = classification)
    grid: str = "spec"             # lr_sweep's preset grid (gapt.sweep.grid.GRIDS: spec, davpt, adamw, ...)

    @property
    def metrics(self) -> Tuple[str, ...]:
        return ("mIoU", "mIoU_ms") if self.benchmark == "ade20k" else ("test_top1",)


@dataclass
class Plan:
    name: str
    title: str
    specs: List[RunSpec]
    table: Optional[str] = None    # the paper table (paper.TABLES) the output sits beside
    render: Optional[Callable[["Plan", Dict[str, List[Dict[str, Any]]], Path], List[Path]]] = None
    notes: List[str] = field(default_factory=list)


# -- the plans ----------------------------------------------------------------------------------
_ROW_SLUG = {"VPT-shallow": "vpt-shallow", "VPT-deep": "vpt-deep", "Ours": "ours"}


def _baseline_preset(benchmark: str, backbone: str, method: str, task: str) -> str:
    return f"{benchmark}/{backbone}/{method}/{task}.yaml"


def _cell(table: str, backbone: str, row: "P.PaperRow", task: str, benchmark: str, *,
          preset_backbone: Optional[str] = None, num_prompts: Optional[int] = None,
          lr_sweep: Optional[bool] = None, slug: Optional[str] = None, extra: Sequence[str] = ()) -> RunSpec:
    """The run for one paper row on one dataset: Ours from its Table 5 preset, baselines from theirs."""
    pb = preset_backbone or backbone
    ours = row.method.startswith("gated")
    if benchmark == "ade20k":
        preset = f"ade20k/{pb}.yaml" if ours else f"ade20k/{pb}-{row.method}.yaml"
    else:
        preset = f"{benchmark}/{pb}/{task}.yaml" if ours else _baseline_preset(benchmark, pb, row.method, task)
    n = num_prompts if num_prompts is not None else row.num_prompts
    overrides = list(extra)
    if backbone != pb:
        overrides.append(f"backbone={backbone}")
    if n is not None:
        overrides.append(f"num_prompts={n}")
    if row.gate_type != "soft":
        overrides.append(f"gate_type={row.gate_type}")
    if lr_sweep is None:  # segmentation keeps SPEC §6's lr 0.001 for every row
        lr_sweep = not ours and benchmark != "ade20k"
    slug = slug or ("ours" if ours else row.method) + ("-hard" if row.gate_type == "hard" else "")
    return RunSpec(name=f"{backbone}/{slug}/{task}", row=row.label, backbone=backbone, method=row.method,
                   benchmark=benchmark, task=task, preset=preset, overrides=overrides, lr_sweep=lr_sweep,
                   gate_type=row.gate_type, num_prompts=n, runner=SEG_RUNNER if benchmark == "ade20k" else "")


def _plan_rows(name: str, **kw) -> Plan:
    table = P.TABLES[name]
    specs = [_cell(name, r.backbone, r, task, table.benchmark, **kw) for r in table.rows for task in table.tasks]
    return Plan(name, table.title, specs, table=name)


def plan_table1() -> Plan:
    """FGVC, MAE and MoCo v3: Ours from the Table 5 presets, VPT-shallow (100) / VPT-deep (10 per block) swept."""
    return _plan_rows("table1")


def plan_table2() -> Plan:
    """VTAB-1k: Ours from Table 5; VPT rows swept, with Table 5's prompt count per task (the paper prints none)."""
    table = P.TABLES["table2"]
    specs = []
    for r in table.rows:
        for task in table.tasks:
            n = P.TABLE5[r.backbone][task][1]
            specs.append(_cell("table2", r.backbone, r, task, "vtab", num_prompts=None if r.method.startswith("gated")
                               else n))
    plan = Plan("table2", table.title, specs, table="table2")
    plan.notes.append("VPT-shallow / VPT-deep use Table 5's prompt count of each task (per block for deep) "
                      "and SPEC §6's lr search; the paper does not print their settings")
    return plan


def plan_table3() -> Plan:
    """ADE20K, 100 prompts (VPT-deep: 10 per block, gapt's choice), lr 0.001 for every row."""
    plan = _plan_rows("table3")
    for s in plan.specs:
        if s.method == "vpt-deep":
            s.num_prompts = 10
            s.overrides.append("num_prompts=10")
    plan.notes.append("VPT-deep on ADE20K: 10 prompts per block (the paper does not say)")
    return plan


def plan_table4() -> Plan:
    """MAE CUB / Flowers: VPT-shallow (swept), Ours with hard gates and Ours (Table 5 settings)."""
    return _plan_rows("table4")


def plan_table6() -> Plan:
    """ADE20K with 24 prompts (VPT-deep: 2 per block)."""
    table = P.TABLES["table6"]
    specs = [_cell("table6", r.backbone, r, "ade20k", "ade20k", slug=f"{_ROW_SLUG[r.label]}-np{r.num_prompts}")
             for r in table.rows]
    return Plan("table6", table.title, specs, table="table6")


def plan_table7() -> Plan:
    """MAE FGVC at 24/48/96 prompts: Ours with Table 1's settings, VPT-deep (total / 12 per block) swept."""
    table = P.TABLES["table7"]
    specs = []
    for r in table.rows:
        slug = f"{'ours' if r.method.startswith('gated') else 'vpt-deep'}-np{r.num_prompts}"
        for task in table.tasks:
            specs.append(_cell("table7", r.backbone, r, task, "fgvc", slug=slug))
    return Plan("table7", table.title, specs, table="table7")


def plan_table8() -> Plan:
    """MAE ViT-L/16 and MoCo v3 ViT-S/16, 48 prompts, CUB / Flowers: every row swept (Table 5 is ViT-B's).
    VPT-deep's 48 prompts are spread over the blocks: 2 per block on ViT-L/16 (24 blocks), 4 on ViT-S/16 (12)."""
    table = P.TABLES["table8"]
    base = {"mae_vitl16": "mae_vitb16", "mocov3_vits16": "mocov3_vitb16"}
    specs = [_cell("table8", r.backbone, r, task, "fgvc", preset_backbone=base[r.backbone], lr_sweep=True)
             for r in table.rows for task in table.tasks]
    plan = Plan("table8", table.title, specs, table="table8")
    plan.notes.append("every row searches the lr on val: the paper gives no settings for ViT-L / ViT-S; "
                      "the other settings are the ViT-B presets'")
    return plan


# name -> a function returning the Plan; figure plans (lane i14) are added here too.
PLANS: Dict[str, Callable[[], Plan]] = {
    "table1": plan_table1, "table2": plan_table2, "table3": plan_table3, "table4": plan_table4,
    "table6": plan_table6, "table7": plan_table7, "table8": plan_table8,
}


def _figure_plan(module: str, name: str) -> Callable[[], Plan]:
    """A figure's plan lives in its analysis module (imported when asked for: those import torch)."""
    def plan() -> Plan:
        import importlib
        return getattr(importlib.import_module(f"gapt.analysis.{module}"), name)()
    plan.__name__ = name
    return plan


# Figures (SPEC §8): each plan and its render live beside the analysis that draws it.
PLANS.update({
    "fig1": _figure_plan("insertion", "plan_fig1"), "fig2": _figure_plan("reconstruct", "plan_fig2"),
    "fig4": _figure_plan("gates", "plan_fig4"), "fig5": _figure_plan("attention", "plan_fig5"),
    "fig6": _figure_plan("ablation", "plan_fig6"), "fig7": _figure_plan("tokens", "plan_fig7"),
    "fig8": _figure_plan("ablation", "plan_fig8"), "fig9": _figure_plan("reconstruct", "plan_fig9"),
    "fig10": _figure_plan("reconstruct", "plan_fig10"),
    "fig11": _figure_plan("reconstruct", "plan_fig11"),
})


def _plan_peers(**kw) -> Plan:
    """`gapt reproduce peers` (SPEC §12.7): gapt/paper/peers_plan.py, imported by name (it imports this module);
    keywords: benchmark, backbone, methods."""
    import importlib
    return importlib.import_module("gapt.paper.peers_plan").plan_peers(**kw)


PLANS["peers"] = _plan_peers


def get_plan(name: str) -> Plan:
    if name not in PLANS:
        raise ReproduceError(f"unknown table {name!r}; choose one of {', '.join(PLANS)}")
    return PLANS[name]()
