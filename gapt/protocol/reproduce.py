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

import dataclasses
import datetime as _dt
import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .. import config as C
from . import paper as P

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
    """MAE ViT-L/16 and MoCo v3 ViT-S/16, 48 prompts, CUB / Flowers: every row swept (Table 5 is ViT-B's)."""
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
        return getattr(importlib.import_module(f"gapt.protocol.{module}"), name)()
    plan.__name__ = name
    return plan


# Figures (SPEC §8): each plan and its render live beside the analysis that draws it.
PLANS.update({
    "fig1": _figure_plan("analysis_insertion", "plan_fig1"), "fig2": _figure_plan("analysis_reconstruct", "plan_fig2"),
    "fig4": _figure_plan("analysis_gates", "plan_fig4"), "fig5": _figure_plan("analysis_attention", "plan_fig5"),
    "fig6": _figure_plan("analysis_ablation", "plan_fig6"), "fig7": _figure_plan("analysis_tokens", "plan_fig7"),
    "fig8": _figure_plan("analysis_ablation", "plan_fig8"), "fig9": _figure_plan("analysis_reconstruct", "plan_fig9"),
})


def get_plan(name: str) -> Plan:
    if name not in PLANS:
        raise ReproduceError(f"unknown table {name!r}; choose one of {', '.join(PLANS)}")
    return PLANS[name]()


# -- checks before any run ----------------------------------------------------------------------
def dataset_folder(data_root: Path, spec: RunSpec) -> Path:
    """Where --data-root holds a spec's dataset: FGVC <root>/<CUB_200_2011 ...>, VTAB <root>/<task>,
    ADE20K <root>/ADEChallengeData2016."""
    if spec.benchmark == "fgvc":
        return Path(data_root) / FGVC_FOLDERS[spec.task]
    if spec.benchmark == "ade20k":
        return Path(data_root) / ADE20K_FOLDER
    return Path(data_root) / spec.task


def _data_override(data_root: Path, spec: RunSpec) -> str:
    folder = data_root if spec.benchmark == "vtab" else dataset_folder(data_root, spec)
    return f"data.root={_quote(str(folder))}"


def _quote(value: str) -> str:
    return value.replace(",", "\\,")


def parse_weights(items: Sequence[str], backbones: Sequence[str]) -> Dict[str, str]:
    """``--weights FILE`` (a plan with one backbone) or ``--weights BACKBONE=FILE`` (repeatable)."""
    out: Dict[str, str] = {}
    plain = [w for w in items if "=" not in w]
    for w in items:
        if "=" in w:
            bb, path = w.split("=", 1)
            if bb not in backbones:
                raise ReproduceError(f"--weights {w}: this plan has no backbone {bb!r} (it uses {', '.join(backbones)})")
            out[bb] = path
    if plain:
        if len(plain) > 1 or len(backbones) > 1:
            raise ReproduceError(f"this plan uses {len(backbones)} backbones ({', '.join(backbones)}): give "
                                 f"--weights BACKBONE=FILE for each (or --backbone to run one)")
        out[backbones[0]] = plain[0]
    return out


def check_inputs(plan: Plan, data_root: Path, weights: Dict[str, str], user_keys: Sequence[str]) -> None:
    """Every dataset folder and weights file the plan needs exists, or one error naming all that miss."""
    missing = []
    for spec in plan.specs:
        folder = dataset_folder(data_root, spec)
        if not folder.is_dir() and f"{spec.benchmark} {spec.task}" not in " ".join(missing):
            missing.append(f"{spec.benchmark} {spec.task} (looked for {folder})")
    if missing:
        raise ReproduceError(f"--data-root {data_root}: missing dataset(s): " + "; ".join(missing))
    if "weights" in user_keys:
        return
    for bb in sorted({s.backbone for s in plan.specs}):
        path = weights.get(bb)
        if path is None:
            raise ReproduceError(f"no weights for backbone {bb}: give --weights FILE or --weights {bb}=FILE")
        if not Path(path).is_file():
            raise ReproduceError(f"weights file for {bb} not found: {path}")


# -- running ------------------------------------------------------------------------------------
def spec_overrides(spec: RunSpec, data_root: Path, weights: Dict[str, str], user: Sequence[str]) -> List[str]:
    """The preset's overrides, in order: the spec's, the dataset and weights, then the user's."""
    out = list(spec.overrides) + [_data_override(data_root, spec)]
    if spec.backbone in weights:
        out.append(f"weights={_quote(weights[spec.backbone])}")
    return out + list(user)


def spec_jobs(spec: RunSpec, out: Path, overrides: Sequence[str], seeds: int):
    """The final runs of a spec with published settings: seeds 42.. (the preset's seed + i), data.final=true."""
    from .sweep_jobs import Job
    folder = out / spec.name
    jobs = []
    try:
        base = C.load_config(str(PRESETS / spec.preset), list(overrides))
        error = None
    except C.ConfigError as e:
        base, error = None, f"ConfigError: {e}"
    for i in range(seeds):
        seed = (base.train.seed if base else 42) + i
        job = Job("final", f"{spec.name}/final/seed{seed}", folder / "final" / f"seed{seed}", {}, seed=seed,
                  runner=spec.runner)
        if base is not None:
            job.cfg = dataclasses.replace(base, out=str(job.folder), data=dataclasses.replace(base.data, final=True),
                                          train=dataclasses.replace(base.train, seed=seed))
        job.config_error = error
        jobs.append(job)
    return jobs


def _epochs(cfg: C.RunConfig) -> int:
    return cfg.seg.iterations if cfg.data.format == "ade20k" else cfg.train.epochs


def dry_run(plan: Plan, out: Path, data_root: Path, weights: Dict[str, str], user: Sequence[str],
            seeds: int) -> Dict[str, Any]:
    """What would run: per spec its runs (trials + finals), their settings and epochs; nothing is trained."""
    from .sweep import plan_sweep
    from .sweep_jobs import folder_state
    rows, total_runs, total_epochs = [], 0, 0
    for spec in plan.specs:
        over = spec_overrides(spec, data_root, weights, user)
        cfg = C.load_config(str(PRESETS / spec.preset), over)
        if spec.lr_sweep:
            sp = plan_sweep(str(PRESETS / spec.preset), over + [f"out={out / spec.name}"])
            runs = len(sp.trials) + seeds
            lrs = ",".join(str(j.overrides.get("train.lr", cfg.train.lr)) for j in sp.trials)
            what = f"lr sweep {lrs} on val, then {seeds} final(s)"
        else:
            runs = seeds
            what = f"{seeds} final(s) at lr {cfg.train.lr}"
        done = sum(folder_state(out / spec.name / "final" / f"seed{cfg.train.seed + i}") == "done"
                   for i in range(seeds))
        unit = "iterations" if cfg.data.format == "ade20k" else "epochs"
        rows.append({"name": spec.name, "row": spec.row, "task": spec.task, "preset": spec.preset,
                     "overrides": over, "runs": runs, unit: _epochs(cfg), "what": what, "finals_done": done,
                     "settings": f"np={cfg.num_prompts} gi={cfg.gate_init:g} bs={cfg.train.batch_size} "
                                 f"gate={cfg.gate_type} temp={'on' if cfg.learn_temperature else 'off'} "
                                 f"precision={cfg.train.precision}"})
        total_runs += runs
        total_epochs += runs * _epochs(cfg)
    return {"plan": plan.name, "out": str(out), "specs": rows, "runs": total_runs, "epochs": total_epochs}


class _PlanProgress:
    """reproduce.json: every spec's state, rewritten as runs end."""

    def __init__(self, out: Path, plan: Plan):
        self.path = out / REPRODUCE_FILE
        self.state: Dict[str, Any] = {"plan": plan.name, "started": _now(), "specs": {}}

    def set(self, name: str, **rec) -> None:
        self.state["specs"].setdefault(name, {}).update(rec)
        self.write()

    def write(self) -> None:
        from .sweep_jobs import _write_json
        self.state["updated"] = _now()
        _write_json(self.path, self.state)


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def run_plan(plan: Plan, out, data_root, *, weights: Sequence[str] = (), overrides: Sequence[str] = (),
             seeds: int = 1, backend: str = "local", workers: Optional[int] = None, preload: Sequence[str] = (),
             retry_failed: bool = False, executor=None, ray_options: Optional[dict] = None) -> Dict[str, Any]:
    """Run every spec of ``plan`` under ``out`` (resumable); return reproduce.json's content.

    Specs with published settings run as one batch of final runs on the executor; lr-sweep specs
    run one ``gapt sweep`` each on the same executor. A failed run is recorded (status, error) and
    the plan goes on; ``failed`` in the result lists them.
    """
    from .sweep import _classify, _Progress, _run
    from .sweep_executors import make_executor
    from .sweep_jobs import SweepError, check_same_run
    out, data_root = Path(out), Path(data_root)
    user = list(overrides)
    user_keys = [o.split("=", 1)[0].strip() for o in user]
    for bad in ("out", "data.final", "train.seed"):
        if bad in user_keys:
            raise ReproduceError(f"{bad}= is set by gapt reproduce (use --out / --seeds)")
    if getattr(plan, "execute", None) is not None:  # a figure that trains nothing (fig2, fig9: DIP jobs)
        return _run_execute(plan, Path(out), Path(data_root), weights, backend, workers, preload, executor,
                            "device=cpu" not in list(overrides))
    wmap = parse_weights(list(weights), sorted({s.backbone for s in plan.specs}))
    check_inputs(plan, data_root, wmap, user_keys)
    C.parse_overrides(user)  # a typo'd key stops here, before any run
    if executor is None:
        if backend == "ray" and any(s.runner for s in plan.specs):
            raise ReproduceError(f"{plan.name} trains segmentation models, which --backend ray does not run yet; "
                                 f"use the local backend")
        executor = make_executor(backend, workers, preload, use_gpus="device=cpu" not in user, **(ray_options or {}))
    out.mkdir(parents=True, exist_ok=True)
    progress = _PlanProgress(out, plan)
    progress.state.update(data_root=str(data_root), overrides=user, seeds=seeds)

    direct, swept = [s for s in plan.specs if not s.lr_sweep], [s for s in plan.specs if s.lr_sweep]
    jobs = []
    for spec in direct:
        for job in spec_jobs(spec, out, spec_overrides(spec, data_root, wmap, user), seeds):
            check_same_run(job)
            jobs.append(job)
    for i, job in enumerate(jobs, 1):
        job.index, job.total = i, len(jobs)
    sp_state: Dict[str, Any] = {"trials": [], "finals": []}
    sp = _Progress(sp_state, out / ".jobs")
    sp.write = lambda: None  # reproduce.json is this plan's record

    def ended(job, status):
        progress.set(job.name, status=status, error=sp.records[(job.kind, job.name)].get("error"),
                     test_top1=sp.records[(job.kind, job.name)].get("test_top1"))
    sp.end_hook = ended
    if jobs:
        log.info("%s: %d final run(s) with the paper's settings; %s", plan.name, len(jobs),
                 executor.describe() if hasattr(executor, "describe") else "")
    pending = _classify(jobs, sp, retry_failed)
    for job in jobs:
        rec = sp.records[(job.kind, job.name)]
        progress.set(job.name, status=rec["status"], error=rec.get("error"))
    _run(executor, pending, sp, False)

    from .sweep import run_sweep
    for spec in swept:
        name = spec.name
        try:
            state = run_sweep(str(PRESETS / spec.preset),
                              spec_overrides(spec, data_root, wmap, user) + [f"out={out / name}"],
                              seeds=seeds, executor=executor, retry_failed=retry_failed)
            progress.set(name, status=state["status"], choice=state.get("choice"),
                         final_test_top1=state.get("final_test_top1"))
        except (SweepError, C.ConfigError) as e:
            log.error("%s: %s", name, e)
            progress.set(name, status="failed", error=str(e))
    failed = {k: v.get("error") for k, v in progress.state["specs"].items() if v.get("status") not in ("done",)}
    progress.state["failed"] = failed
    progress.state["status"] = "done" if not failed else "failed"
    progress.write()
    return progress.state


def _run_execute(plan: Plan, out: Path, data_root: Path, weights: Sequence[str], backend: str,
                 workers: Optional[int], preload: Sequence[str], executor, use_gpus: bool) -> Dict[str, Any]:
    """Run a plan's own ``execute(plan, out, data_root, {backbone: file}, executor)``; reproduce.json's shape."""
    from .sweep_executors import make_executor
    wmap: Dict[str, str] = {}
    for w in weights:
        if "=" not in w:
            raise ReproduceError(f"{plan.name} uses several backbones: give --weights BACKBONE=FILE for each")
        bb, path = w.split("=", 1)
        if not Path(path).is_file():
            raise ReproduceError(f"weights file for {bb} not found: {path}")
        wmap[bb] = path
    if not data_root.is_dir():
        raise ReproduceError(f"--data-root {data_root} is not a folder")
    executor = executor or make_executor(backend, workers, preload, use_gpus=use_gpus)
    try:
        summary = plan.execute(plan, out, data_root, wmap, executor)
    except (FileNotFoundError, ValueError) as e:
        raise ReproduceError(str(e)) from None
    failed = {m["job"]: m.get("error") for m in summary.get("failed", [])}
    state = {"plan": plan.name, "status": "failed" if failed else "done", "failed": failed}
    from .sweep_jobs import _write_json
    _write_json(out / REPRODUCE_FILE, state)
    return state


# -- results and the table ----------------------------------------------------------------------
def spec_results(plan: Plan, out, seeds: int = 1) -> Dict[str, List[Dict[str, Any]]]:
    """spec name -> the results.json of its finished final runs (seeds ``42..42+seeds-1`` of the preset)."""
    out = Path(out)
    found: Dict[str, List[Dict[str, Any]]] = {}
    for spec in plan.specs:
        runs = []
        final = out / spec.name / "final"
        for f in sorted(final.glob("seed*/results.json")) if final.is_dir() else []:
            try:
                runs.append(json.loads(f.read_text()))
            except (OSError, ValueError):
                continue
        found[spec.name] = runs[:seeds] if seeds else runs
    return found


def _mean(xs: Sequence[float]) -> Optional[float]:
    return statistics.fmean(xs) if xs else None


def _paper_metric(benchmark: str, column: str) -> str:
    return {"miou": "mIoU", "miou_ms": "mIoU_ms"}.get(column, "test_top1") if benchmark == "ade20k" else "test_top1"


def table_rows(plan: Plan, results: Dict[str, List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """One row per (backbone, paper row): every printed column with ours, paper and the difference.

    A column is a dataset (mean over its seeds), a mean of datasets (FGVC mean, VTAB group means and
    the 19-task mean: each needs every dataset it covers, else it is missing), or an ADE20K metric.
    ``total_params``: (backbone + every task's prompts, gates, temperatures and head) / backbone, as
    the paper computes it, when each task has a finished run that recorded its parameter counts.
    """
    table = P.TABLES[plan.table]
    groups: Dict[Tuple[str, str, str, Optional[int]], List[RunSpec]] = {}
    for s in plan.specs:
        groups.setdefault((s.backbone, s.row, s.gate_type, s.num_prompts), []).append(s)
    rows = []
    for (backbone, label, gate_type, n), specs in groups.items():
        method = specs[0].method
        paper_row = next((r for r in table.rows if r.backbone == backbone and r.label == label
                          and r.gate_type == gate_type), None)
        per_task: Dict[str, Dict[str, Optional[float]]] = {}
        seeds_by_task: Dict[str, List[int]] = {}
        tuned, backbone_params = {}, None
        for s in specs:
            runs = results.get(s.name, [])
            per_task[s.task] = {m: _mean([r["metrics"][m] for r in runs if r.get("metrics", {}).get(m) is not None])
                                for m in s.metrics}
            seeds_by_task[s.task] = [r.get("seed") for r in runs]
            if runs and runs[0].get("tuned_params") is not None:
                tuned[s.task] = runs[0]["tuned_params"]
                backbone_params = runs[0].get("backbone_params", backbone_params)
        cells = {}
        for col in table.columns:
            metric = _paper_metric(table.benchmark, col)
            if table.benchmark == "ade20k":
                ours = per_task.get("ade20k", {}).get(metric)
            elif col in per_task:
                ours = per_task[col][metric]
            else:
                covered = P.VTAB_GROUPS.get(col) or (table.tasks if col == "mean" else ())
                vals = [per_task.get(t, {}).get(metric) for t in covered]
                ours = _mean(vals) if vals and all(v is not None for v in vals) else None
            ref = paper_row.values.get(col) if paper_row else None
            cells[col] = {"ours": ours, "paper": ref, "diff": None if ours is None or ref is None else ours - ref}
        total = None
        if backbone_params and all(t in tuned for t in table.tasks):
            total = (backbone_params + sum(tuned[t] for t in table.tasks)) / backbone_params
        seeds = sorted({x for v in seeds_by_task.values() for x in v if x is not None})
        rows.append({"backbone": backbone, "row": label, "method": method, "gate_type": gate_type,
                     "num_prompts": n, "cells": cells, "seeds": seeds,
                     "runs": sum(len(results.get(s.name, [])) for s in specs), "expected_tasks": len(specs),
                     "total_params": total, "paper_total_params": paper_row.total_params if paper_row else None})
    return rows


def _fmt(x: Optional[float], signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def render_table(plan: Plan, results: Dict[str, List[Dict[str, Any]]], out_dir) -> List[Path]:
    """``<plan>.md`` and ``<plan>.csv``: each cell ours / paper / ours − paper."""
    table = P.TABLES[plan.table]
    rows = table_rows(plan, results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with_params = any(r["paper_total_params"] is not None or r["total_params"] is not None for r in rows)
    unit = "mIoU %" if table.benchmark == "ade20k" else "test top-1 %"
    md = [f"# {plan.name}: {table.title}", "",
          f"Each cell: ours (mean over seeds) / paper (ours − paper), {unit}. \"—\" marks a run or a "
          f"paper number that is missing; a mean column needs every dataset it covers.", ""]
    md += [f"> {n}" for n in list(table.notes) + list(plan.notes)]
    md.append("")
    head = ["backbone", "row", "gate", "prompts", "seeds"] + list(table.columns)
    if with_params:
        head.append("total params")
    md.append("| " + " | ".join(head) + " |")
    md.append("|" + "---|" * len(head))
    csv_lines = ["table,backbone,row,method,gate_type,num_prompts,column,ours,paper,diff,seeds"]
    for r in rows:
        cells = [f"{_fmt(c['ours'])} / {_fmt(c['paper'])} ({_fmt(c['diff'], True)})" for c in r["cells"].values()]
        prompts = "per task" if not r["num_prompts"] else f"{r['num_prompts']}{'/block' if r['method'] == 'vpt-deep' else ''}"
        line = [r["backbone"], r["row"], r["gate_type"], prompts,
                " ".join(map(str, r["seeds"])) or "—"] + cells
        if with_params:
            tp, pp = r["total_params"], r["paper_total_params"]
            line.append(f"{tp:.3f}x / {pp:.2f}x" if tp and pp else f"{tp:.3f}x / —" if tp else
                        f"— / {pp:.2f}x" if pp else "—")
        md.append("| " + " | ".join(x.replace("|", "\\|") for x in line) + " |")
        extra = [("total_params", r["total_params"], r["paper_total_params"])] if with_params else []
        for col, ours, ref in [(c, v["ours"], v["paper"]) for c, v in r["cells"].items()] + extra:
            diff = None if ours is None or ref is None else ours - ref
            csv_lines.append(",".join([plan.name, r["backbone"], _csv(r["row"]), r["method"], r["gate_type"],
                                       str(r["num_prompts"] or ""), col, _num(ours), _num(ref), _num(diff),
                                       " ".join(map(str, r["seeds"]))]))
    md.append("")
    paths = [out_dir / f"{plan.name}.md", out_dir / f"{plan.name}.csv"]
    paths[0].write_text("\n".join(md), encoding="utf-8")
    paths[1].write_text("\n".join(csv_lines) + "\n", encoding="utf-8")
    return paths


def _csv(text: str) -> str:
    return f'"{text}"' if "," in text else text


def _num(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.4f}"


def render_plan(plan: Plan, out, seeds: int = 1) -> List[Path]:
    """The plan's output from its finished runs: its own ``render``, or the table beside the paper's."""
    results = spec_results(plan, out, seeds)
    render = plan.render or render_table
    return render(plan, results, Path(out))
