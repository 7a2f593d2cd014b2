"""Tables of finished runs next to the paper's numbers (``gapt report``).

A *run folder* is any folder holding a ``results.json`` written by the training engine::

    {"backbone": "mae_vitb16", "method": "gated", "learn_temperature": true,
     "prompt_init": "random", "num_prompts": 100, "benchmark": "fgvc", "task": "cub",
     "seed": 42, "final": true,
     "metrics": {"val_top1_best": 71.2, "best_epoch": 87, "test_top1": 70.9, ...}, ...}

Segmentation runs have ``"benchmark": "ade20k"`` and ``metrics.mIoU`` (single-scale,
required) and optionally ``metrics.mIoU_ms`` (multi-scale).

A report row pools only runs that differ in seed alone: rows are keyed by benchmark, backbone,
method key (:func:`gapt.protocol.paper.method_key`, e.g. ``gated+temperature``), task and the
run's settings (:data:`SETTING_KEYS`: gate type and Gumbel temperature, prompt count, gate init,
lr, weight decay, batch size, epochs, dropout, pooling, precision, final or trial). Runs with
4 and 100 prompts, or two backbone sizes, are never averaged; every row shows the settings it
stands for. Sweep trials (``"final": false``) are left out unless ``include_trials=True``.

Per task: mean over seeds, sample standard deviation (ddof=1; shown as "-" in Markdown
and left empty in CSV when there is one seed), the number of seeds and the seeds.
Each row sits beside the paper row with the same backbone, method, gate type and prompt
count (:func:`gapt.protocol.paper.find_paper_row`): Table 1/2/3 at the paper's prompt counts,
Table 4 for hard gates, Table 7 for 24/48/96-prompt MAE FGVC, Table 8 for ViT-L MAE / ViT-S
MoCo v3, Table 6 for 24-prompt ADE20K; the ``table`` column names it.
Per (benchmark, backbone, method key, settings shared by the tasks): the FGVC mean over the 5
datasets, the VTAB-1k group means (each the mean of its tasks' means) and the 19-task mean
(the mean of the 19 task means, not of the group means), each next to the paper's number and
the difference ours - paper. lr, gate init, batch size and weight decay may differ between
tasks (the paper picks them per task, Table 5), and on VTAB-1k the prompt count too; a task
with two rows in one summary (two lrs, say) makes that summary's mean missing, with a note.
A mean that needs a missing task is missing ("—" in Markdown, empty in CSV); it is never
taken over the tasks present. The separate column "mean over present k/N" gives that partial
mean, labelled as such, for a look at unfinished sweeps; it is not comparable with the paper.
The total-parameters column is computed as the paper does: (backbone + every task's prompts,
gates, temperatures and head) / backbone, from results.json's ``backbone_params`` and
``tuned_params``, when every task is present.

Runs of other benchmarks (folder, csv, shapes, ...) are listed per task, without paper
columns. ``only_final=True`` is the default behaviour, kept for callers that pass it.
"""
from __future__ import annotations

import csv as _csv
import io
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .paper import (ADE20K_METRICS, FGVC_TASKS, VTAB_GROUP_OF, VTAB_GROUPS, VTAB_TASKS, find_paper_row,
                    method_key as _method_key)

RESULTS_FILE = "results.json"
MISSING = "—"  # shown in Markdown for a missing value (CSV leaves the cell empty)

REQUIRED_KEYS = ("backbone", "method", "learn_temperature", "prompt_init", "benchmark",
                 "task", "seed", "metrics")

# One CSV row per task row and per summary row; Markdown shows a subset.
CSV_FIELDS = ("section", "benchmark", "backbone", "method", "group", "name", "metric",
              "mean", "std", "n_seeds", "seeds", "num_prompts", "final",
              "paper", "diff", "present", "mean_over_present",
              "gate_type", "settings", "paper_table", "total_params", "paper_total_params")

# What a run was, besides its seed: runs pool into one row only when all of these agree.
SETTING_KEYS = ("num_prompts", "gate_type", "gate_temperature", "gate_init", "lr", "weight_decay", "batch_size",
                "epochs", "iterations", "prompt_dropout", "pooling", "precision", "tf32", "final")
# Settings the paper picks per task (Table 5): a benchmark mean may combine tasks that differ in them.
PER_TASK_KEYS = {"fgvc": ("lr", "gate_init", "batch_size", "weight_decay"),
                 "vtab": ("lr", "gate_init", "batch_size", "weight_decay", "num_prompts")}
_SHORT = {"num_prompts": "np", "gate_type": "gate", "gate_temperature": "t", "gate_init": "gi", "lr": "lr",
          "weight_decay": "wd", "batch_size": "bs", "epochs": "ep", "iterations": "it", "prompt_dropout": "pd",
          "pooling": "pool", "precision": "", "tf32": "", "final": ""}

_BENCHMARK_ORDER = ("fgvc", "vtab", "ade20k")
_METHOD_ORDER = ("linear", "full", "vpt-shallow", "vpt-deep", "vpt-at-block", "gated")
_SUMMARY_LABELS = {"natural": "Natural (7)", "specialized": "Specialized (4)",
                   "structured": "Structured (8)"}


# ----------------------------------------------------------------------------- loading

def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def primary_metrics(benchmark: str) -> Tuple[str, ...]:
    """The metrics reported for a benchmark: ``test_top1``, or mIoU (+ multi-scale) for segmentation."""
    return ADE20K_METRICS if benchmark in ("ade20k", "seg_folder") else ("test_top1",)


def validate_run(run: Dict[str, Any], source: str = "<run>") -> None:
    """Raise ValueError naming ``source`` and the first missing or malformed key."""
    if not isinstance(run, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(run).__name__}")
    for key in REQUIRED_KEYS:
        if key not in run:
            raise ValueError(f"{source}: missing required key {key!r}")
    for key in ("backbone", "method", "benchmark", "task", "prompt_init"):
        if not isinstance(run[key], str) or not run[key]:
            raise ValueError(f"{source}: key {key!r} must be a non-empty string, got {run[key]!r}")
    if not isinstance(run["learn_temperature"], bool):
        raise ValueError(f"{source}: key 'learn_temperature' must be true or false, "
                         f"got {run['learn_temperature']!r}")
    if not isinstance(run["seed"], int) or isinstance(run["seed"], bool):
        raise ValueError(f"{source}: key 'seed' must be an integer, got {run['seed']!r}")
    if "final" in run and not isinstance(run["final"], bool):
        raise ValueError(f"{source}: key 'final' must be true or false, got {run['final']!r}")
    metrics = run["metrics"]
    if not isinstance(metrics, dict):
        raise ValueError(f"{source}: key 'metrics' must be an object, got {type(metrics).__name__}")
    required_metric = primary_metrics(run["benchmark"])[0]
    if required_metric not in metrics:
        raise ValueError(f"{source}: missing required key 'metrics.{required_metric}'")
    for name in primary_metrics(run["benchmark"]):
        value = metrics.get(name)
        if name != required_metric and value is None:
            continue  # optional metric (mIoU_ms): absent or null means missing
        if not _is_number(value):
            raise ValueError(f"{source}: key 'metrics.{name}' must be a finite number, got {value!r}")


def load_run(path: Union[str, Path]) -> Dict[str, Any]:
    """Read one ``results.json`` (or the run folder holding it) and validate it.

    The returned dict is the JSON object plus ``run_dir`` (the folder it came from).
    """
    path = Path(path)
    file = path / RESULTS_FILE if path.is_dir() else path
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{file}: cannot read: {e}") from e
    try:
        run = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON: {e}") from e
    validate_run(run, str(file))
    run = dict(run)
    run["run_dir"] = str(file.parent)
    return run


def collect_runs(paths: Union[str, Path, Iterable[Union[str, Path]]]) -> List[Dict[str, Any]]:
    """Every run folder (a folder holding ``results.json``) under ``paths``, recursively.

    A path may be a folder (searched recursively; folders without results.json are
    skipped, nested run folders such as sweep trials are found) or a results.json file.
    A run reached twice through overlapping paths is read once. Runs come back sorted
    by folder. A path that does not exist raises FileNotFoundError; a results.json
    that is not valid JSON or lacks a required key raises ValueError naming the file.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: List[Path] = []
    seen = set()
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"no such run folder: {p}")
        if p.is_file():
            found = [p]
        else:
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames.sort()
                if RESULTS_FILE in filenames:
                    found.append(Path(dirpath) / RESULTS_FILE)
        for f in found:
            real = os.path.realpath(f)
            if real not in seen:
                seen.add(real)
                files.append(f)
    files.sort(key=lambda f: str(f))
    return [load_run(f) for f in files]


# ----------------------------------------------------------------------------- report

def run_settings(run: Dict[str, Any]) -> Tuple[Tuple[str, Any], ...]:
    """The settings a run stands for (:data:`SETTING_KEYS` that apply to its method; absent keys left out)."""
    out = []
    for key in SETTING_KEYS:
        value = run.get(key, True if key == "final" else None)
        if key == "gate_type" and run["method"] == "gated" and value is None:
            value = "soft"  # results.json from before hard gates
        if key in ("gate_type", "gate_temperature", "gate_init") and run["method"] != "gated":
            continue
        if key == "gate_temperature" and run.get("gate_type", "soft") != "hard":
            continue
        if value is not None:
            out.append((key, value))
    return tuple(out)


def settings_text(settings: Sequence[Tuple[str, Any]]) -> str:
    """``np=100 gate=hard t=1 lr=0.1 ... fp32 final`` (what a row stands for, in one cell)."""
    parts = []
    for key, value in settings:
        if key == "final":
            parts.append("final" if value else "trial")
        elif key == "precision":
            parts.append(str(value))
        elif key == "tf32":
            parts.append("tf32" if value else "no-tf32")
        else:
            parts.append(f"{_SHORT[key]}={value:g}" if isinstance(value, float) else f"{_SHORT[key]}={value}")
    return " ".join(parts)


def run_method_key(run: Dict[str, Any]) -> str:
    return _method_key(run["method"], run.get("learn_temperature", False),
                       run.get("prompt_init", "random"), run.get("insert_at_block"))


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _std(values: Sequence[float]) -> Optional[float]:
    return statistics.stdev(values) if len(values) > 1 else None


def _method_sort_key(key: str):
    base = key.split("+")[0]
    if base.startswith("vpt@"):
        rank, k = _METHOD_ORDER.index("vpt-at-block"), int(base[4:]) if base[4:].isdigit() else 0
    elif base in _METHOD_ORDER:
        rank, k = _METHOD_ORDER.index(base), 0
    else:
        rank, k = len(_METHOD_ORDER), 0
    return (rank, k, key.count("+"), key)


def _benchmark_sort_key(b: str):
    return (_BENCHMARK_ORDER.index(b) if b in _BENCHMARK_ORDER else len(_BENCHMARK_ORDER), b)


def _task_sort_key(benchmark: str, task: str):
    order = {"fgvc": FGVC_TASKS, "vtab": VTAB_TASKS}.get(benchmark, ())
    return (order.index(task) if task in order else len(order), task)


@dataclass
class Report:
    """The tables of a report. ``task_rows`` and ``summary_rows`` are dicts with the
    keys of :data:`CSV_FIELDS`; missing numbers are None."""

    task_rows: List[Dict[str, Any]] = field(default_factory=list)
    summary_rows: List[Dict[str, Any]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    num_runs: int = 0
    only_final: bool = False

    trials_left_out: int = 0

    # -- lookups (used by tests and callers that want one number); ``settings`` narrows by
    # run settings, e.g. num_prompts=48 or final=False
    def tasks(self, benchmark: str, backbone: str, method: str, task: str, metric: Optional[str] = None,
              **settings) -> List[Dict[str, Any]]:
        return [r for r in self.task_rows
                if (r["benchmark"], r["backbone"], r["method"], r["name"]) == (benchmark, backbone, method, task)
                and (metric is None or r["metric"] == metric) and _matches(r, settings)]

    def task(self, benchmark: str, backbone: str, method: str, task: str,
             metric: Optional[str] = None, **settings) -> Optional[Dict[str, Any]]:
        rows = self.tasks(benchmark, backbone, method, task, metric, **settings)
        return rows[0] if rows else None

    def summary(self, benchmark: str, backbone: str, method: str, name: str, **settings) -> Optional[Dict[str, Any]]:
        for r in self.summary_rows:
            if (r["benchmark"], r["backbone"], r["method"], r["name"]) == (benchmark, backbone, method, name) \
                    and _matches(r, settings):
                return r
        return None

    # -- output
    def csv(self) -> str:
        """All rows (task rows, then summary rows) as CSV; missing numbers are empty cells."""
        buf = io.StringIO()
        writer = _csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for r in self.task_rows + self.summary_rows:
            writer.writerow({k: _csv_cell(r.get(k)) for k in CSV_FIELDS})
        return buf.getvalue()

    def markdown(self) -> str:
        out: List[str] = ["# gapt report", ""]
        which = "final runs and sweep trials" if not self.only_final else "final runs" + (
            f" ({self.trials_left_out} sweep trial(s) left out; --include-trials shows them)"
            if self.trials_left_out else "")
        out.append(f"{self.num_runs} runs, {which}. A row pools only runs that differ in seed alone; "
                   f"\"settings\" says what they are. Numbers are test top-1 % (ADE20K: mIoU %); "
                   f"ours = mean over seeds, std = sample std over seeds (ddof=1; \"-\" when there is one seed), "
                   f"n = number of seeds. "
                   f"\"{MISSING}\" marks a missing task, and any mean that needs it is missing too. "
                   f"diff = ours − paper.")
        out.append("")
        for note in self.notes:
            out.append(f"> note: {note}")
        if self.notes:
            out.append("")
        benchmarks = sorted({r["benchmark"] for r in self.task_rows}, key=_benchmark_sort_key)
        for b in benchmarks:
            tasks = [r for r in self.task_rows if r["benchmark"] == b]
            sums = [r for r in self.summary_rows if r["benchmark"] == b]
            if b == "fgvc":
                out += _md_section("FGVC — per dataset", tasks, _TASK_COLS_PAPER)
                out += _md_section("FGVC — mean over the 5 datasets", sums, _SUMMARY_COLS)
            elif b == "vtab":
                out += _md_section("VTAB-1k — per task", tasks, _TASK_COLS_GROUP)
                out += _md_section("VTAB-1k — group means and 19-task mean", sums, _SUMMARY_COLS)
            elif b == "ade20k":
                out += _md_section("ADE20K — mIoU (single-scale) and mIoU_ms (multi-scale)",
                                   tasks, _TASK_COLS_SEG)
            else:
                out += _md_section(f"{b} — per task (no published numbers)", tasks, _TASK_COLS_PLAIN)
        if not benchmarks:
            out.append("No runs.")
            out.append("")
        return "\n".join(out)

    def write(self, out_dir: Union[str, Path]) -> Tuple[Path, Path]:
        """Write ``report.md`` and ``report.csv`` into ``out_dir`` (created); return both paths.

        A report of no runs is an error (:class:`NoRunsError`) and leaves an existing report as it was."""
        if not self.num_runs:
            raise NoRunsError("no runs to report" + (f" ({self.trials_left_out} sweep trial(s) left out; "
                                                     f"--include-trials reports them)" if self.trials_left_out else
                                                     "") + f"; {out_dir} left as it was")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        md, cs = out_dir / "report.md", out_dir / "report.csv"
        md.write_text(self.markdown(), encoding="utf-8")
        cs.write_text(self.csv(), encoding="utf-8")
        return md, cs


class NoRunsError(ValueError):
    """Nothing to report: no run folder, or only sweep trials left out."""


def _matches(row: Dict[str, Any], settings: Dict[str, Any]) -> bool:
    have = dict(row.get("_settings", ()))
    return all(have.get(k) == v for k, v in settings.items())


def build_report(runs: Iterable[Dict[str, Any]], only_final: bool = True, include_trials: bool = False) -> Report:
    """Group runs into per-task and per-benchmark rows (see the module docstring).

    Sweep trials (``"final": false``) are left out unless ``include_trials``; ``only_final``
    (the default) is kept for callers that pass it; ``only_final=False`` includes trials too."""
    runs = list(runs)
    for i, run in enumerate(runs):
        validate_run(run, run.get("run_dir", f"<run {i}>") if isinstance(run, dict) else f"<run {i}>")
    keep_trials = include_trials or not only_final
    trials = [r for r in runs if not r.get("final", True)]
    if not keep_trials:
        runs = [r for r in runs if r.get("final", True)]
    report = Report(num_runs=len(runs), only_final=not keep_trials,
                    trials_left_out=0 if keep_trials else len(trials))

    # task rows: one per (benchmark, backbone, method key, settings, task)
    groups: Dict[Tuple, List[Dict[str, Any]]] = {}
    for run in runs:
        key = (run["benchmark"], run["backbone"], run_method_key(run), run_settings(run), run["task"])
        groups.setdefault(key, []).append(run)

    def summary_settings(benchmark, settings):
        free = PER_TASK_KEYS.get(benchmark, ())
        return tuple((k, v) for k, v in settings if k not in free)

    # a known benchmark's tasks that no run of a summary group covers still get a row, shown as missing
    expected = {"fgvc": FGVC_TASKS, "vtab": VTAB_TASKS}
    covered: Dict[Tuple, set] = {}
    for benchmark, backbone, mkey, settings, task in groups:
        covered.setdefault((benchmark, backbone, mkey, summary_settings(benchmark, settings)), set()).add(task)
    for (benchmark, backbone, mkey, ssettings), tasks in covered.items():
        for task in expected.get(benchmark, ()):
            if task not in tasks:
                groups.setdefault((benchmark, backbone, mkey, ssettings, task), [])

    # per task
    task_values: Dict[Tuple, Dict[str, List[Dict[str, Any]]]] = {}
    for key in sorted(groups, key=lambda k: (_benchmark_sort_key(k[0]), k[1], _method_sort_key(k[2]),
                                             repr(summary_settings(k[0], k[3])), _task_sort_key(k[0], k[4]),
                                             repr(k[3]))):
        benchmark, backbone, mkey, settings, task = key
        members = groups[key]
        sdict = dict(settings)
        seeds = [r["seed"] for r in members]
        dupes = sorted({s for s in seeds if seeds.count(s) > 1})
        if dupes:
            report.notes.append(f"{benchmark}/{backbone}/{mkey}/{task} [{settings_text(settings)}]: seed(s) {dupes} "
                                f"appear more than once with the same settings, all counted (the same run copied "
                                f"twice? sweep trials? leave trials out with --only-final): "
                                + ", ".join(r.get("run_dir", "?") for r in members if r["seed"] in dupes))
        finals = sum(1 for r in members if r.get("final", True))
        if not members:
            final = ""
        else:
            final = "yes" if finals == len(members) else "no" if finals == 0 else f"{finals}/{len(members)}"
        prompts = sorted({r["num_prompts"] for r in members if r.get("num_prompts") is not None})
        group = VTAB_GROUP_OF.get(task, "") if benchmark == "vtab" else ""
        if benchmark == "fgvc" and task not in FGVC_TASKS or benchmark == "vtab" and task not in VTAB_TASKS:
            report.notes.append(f"{benchmark}/{backbone}/{mkey}: task {task!r} is not one of the "
                                f"benchmark's tasks; it is listed but enters no mean")
        table, paper_row = find_paper_row(benchmark, backbone, mkey, sdict.get("num_prompts"),
                                          sdict.get("gate_type", "soft"))
        tuned = next((r.get("tuned_params") for r in members if r.get("tuned_params") is not None), None)
        bparams = next((r.get("backbone_params") for r in members if r.get("backbone_params")), None)
        for metric in primary_metrics(benchmark):
            pairs = [(r["seed"], r["metrics"][metric]) for r in members
                     if r["metrics"].get(metric) is not None]
            values = [v for _, v in pairs]
            mean = _mean(values)
            paper = None
            if paper_row is not None and (benchmark == "fgvc" and task in FGVC_TASKS or benchmark == "ade20k"):
                paper = paper_row.values.get(task if benchmark == "fgvc" else metric.lower())
            row = {
                "section": "task", "benchmark": benchmark, "backbone": backbone, "method": mkey,
                "group": group, "name": task, "metric": metric,
                "mean": mean, "std": _std(values), "n_seeds": len(values),
                "seeds": " ".join(str(s) for s, _ in sorted(pairs)),
                "num_prompts": " ".join(str(p) for p in prompts), "final": final,
                "paper": paper, "diff": _diff(mean, paper), "present": None, "mean_over_present": None,
                "gate_type": sdict.get("gate_type", ""), "settings": settings_text(settings),
                "paper_table": table if paper is not None else "", "total_params": None,
                "paper_total_params": None, "_settings": settings, "_tuned": tuned, "_backbone_params": bparams,
            }
            report.task_rows.append(row)
            if benchmark in ("fgvc", "vtab") and metric == "test_top1":
                skey = (benchmark, backbone, mkey, summary_settings(benchmark, settings))
                task_values.setdefault(skey, {}).setdefault(task, []).append(row)

    # per (benchmark, backbone, method, shared settings): FGVC mean, VTAB group means and 19-task mean
    for (benchmark, backbone, mkey, ssettings), by_task in task_values.items():
        if benchmark == "fgvc":
            columns = [("mean", "", FGVC_TASKS)]
        else:
            columns = [(g, g, tasks) for g, tasks in VTAB_GROUPS.items()] + [("mean", "", VTAB_TASKS)]
        sdict = dict(ssettings)
        ambiguous = sorted(t for t, rows in by_task.items() if len([r for r in rows if r["n_seeds"]]) > 1)
        if ambiguous:
            report.notes.append(f"{benchmark}/{backbone}/{mkey} [{settings_text(ssettings)}]: task(s) "
                                f"{', '.join(ambiguous)} have runs with different settings (e.g. two lrs), so "
                                f"the benchmark means of this group are missing; report fewer runs to get them")
        means = {t: next((r["mean"] for r in rows if r["mean"] is not None), None) for t, rows in by_task.items()}
        table, paper_row = find_paper_row(benchmark, backbone, mkey, sdict.get("num_prompts"),
                                          sdict.get("gate_type", "soft"))
        for name, group, tasks in columns:
            present = [means[t] for t in tasks if means.get(t) is not None]
            full = _mean(present) if len(present) == len(tasks) and not ambiguous else None
            paper = paper_row.values.get(name) if paper_row is not None else None
            total = None
            if name == "mean" and full is not None:
                rows = [next(r for r in by_task[t] if r["mean"] is not None) for t in tasks]
                if all(r["_tuned"] is not None and r["_backbone_params"] for r in rows):
                    b = rows[0]["_backbone_params"]
                    total = (b + sum(r["_tuned"] for r in rows)) / b
            report.summary_rows.append({
                "section": "summary", "benchmark": benchmark, "backbone": backbone, "method": mkey,
                "group": group, "name": name, "metric": "test_top1",
                "mean": full, "std": None, "n_seeds": None, "seeds": "",
                "num_prompts": str(sdict.get("num_prompts", "")) if benchmark == "fgvc" else "per task",
                "final": "",
                "paper": paper, "diff": _diff(full, paper),
                "present": f"{len(present)}/{len(tasks)}", "mean_over_present": _mean(present),
                "gate_type": sdict.get("gate_type", ""), "settings": settings_text(ssettings),
                "paper_table": table if paper is not None else "",
                "total_params": total, "paper_total_params": paper_row.total_params
                if paper_row is not None and name == "mean" else None, "_settings": ssettings,
            })
    return report


def write_report(paths, out_dir, only_final: bool = True, include_trials: bool = False) -> Report:
    """collect_runs + build_report + Report.write, for ``gapt report`` (NoRunsError when nothing to report)."""
    report = build_report(collect_runs(paths), only_final=only_final and not include_trials,
                          include_trials=include_trials)
    report.write(out_dir)
    return report


# ----------------------------------------------------------------------------- formatting

def _diff(ours: Optional[float], paper: Optional[float]) -> Optional[float]:
    return None if ours is None or paper is None else ours - paper


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    return v


def _fmt(v: Optional[float], signed: bool = False) -> str:
    if v is None:
        return MISSING
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def _fmt_std(r: Dict[str, Any]) -> str:
    if r["mean"] is None:
        return MISSING
    return "-" if r["std"] is None else f"{r['std']:.2f}"


def _fmt_name(r: Dict[str, Any]) -> str:
    if r["section"] == "summary":
        if r["name"] == "mean":
            return "mean (19 tasks)" if r["benchmark"] == "vtab" else "mean (5 datasets)"
        return _SUMMARY_LABELS.get(r["name"], r["name"])
    return r["name"]


_COL = {
    "backbone": ("backbone", lambda r: r["backbone"]),
    "method": ("method", lambda r: r["method"]),
    "group": ("group", lambda r: r["group"] or MISSING),
    "task": ("task", _fmt_name),
    "column": ("summary", _fmt_name),
    "metric": ("metric", lambda r: r["metric"]),
    "ours": ("ours", lambda r: _fmt(r["mean"])),
    "std": ("std", _fmt_std),
    "n": ("n", lambda r: str(r["n_seeds"])),
    "seeds": ("seeds", lambda r: r["seeds"] or MISSING),
    "final": ("final", lambda r: r["final"] or MISSING),
    "prompts": ("prompts", lambda r: r["num_prompts"] or MISSING),
    "paper": ("paper", lambda r: _fmt(r["paper"])),
    "diff": ("diff", lambda r: _fmt(r["diff"], signed=True)),
    "present": ("tasks present", lambda r: r["present"]),
    "partial": ("mean over present k/N (not comparable)", lambda r: _fmt(r["mean_over_present"])),
    "settings": ("settings", lambda r: r["settings"] or MISSING),
    "table": ("paper table", lambda r: r["paper_table"] or MISSING),
    "params": ("total params (ours / paper)", lambda r: _fmt_params(r)),
}


def _fmt_params(r: Dict[str, Any]) -> str:
    ours, paper = r.get("total_params"), r.get("paper_total_params")
    if ours is None and paper is None:
        return MISSING
    return f"{f'{ours:.3f}x' if ours is not None else MISSING} / {f'{paper:.2f}x' if paper is not None else MISSING}"

_TASK_COLS_PAPER = ("backbone", "method", "task", "ours", "std", "n", "seeds", "prompts", "settings", "final",
                    "table", "paper", "diff")
_TASK_COLS_GROUP = ("backbone", "method", "group", "task", "ours", "std", "n", "seeds", "prompts", "settings", "final")
_TASK_COLS_SEG = ("backbone", "method", "metric", "ours", "std", "n", "seeds", "prompts", "settings", "final",
                  "table", "paper", "diff")
_TASK_COLS_PLAIN = ("backbone", "method", "task", "ours", "std", "n", "seeds", "prompts", "settings", "final")
_SUMMARY_COLS = ("backbone", "method", "column", "ours", "paper", "diff", "present", "partial", "settings", "table",
                 "params")


def _md_section(title: str, rows: List[Dict[str, Any]], cols: Sequence[str]) -> List[str]:
    lines = [f"## {title}", ""]
    if not rows:
        return lines + ["(none)", ""]
    lines.append("| " + " | ".join(_COL[c][0] for c in cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_COL[c][1](r).replace("|", "\\|") for c in cols) + " |")
    lines.append("")
    return lines
