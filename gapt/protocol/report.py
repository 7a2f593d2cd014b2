"""Tables of finished runs next to the paper's numbers (``gapt report``).

A *run folder* is any folder holding a ``results.json`` written by the training engine::

    {"backbone": "mae_vitb16", "method": "gated", "learn_temperature": true,
     "prompt_init": "random", "num_prompts": 100, "benchmark": "fgvc", "task": "cub",
     "seed": 42, "final": true,
     "metrics": {"val_top1_best": 71.2, "best_epoch": 87, "test_top1": 70.9, ...}, ...}

Segmentation runs have ``"benchmark": "ade20k"`` and ``metrics.mIoU`` (single-scale,
required) and optionally ``metrics.mIoU_ms`` (multi-scale).

Runs are grouped by (benchmark, backbone, method key, task); the method key follows
:func:`gapt.protocol.paper.method_key` (e.g. gated + learned temperature is
``gated+temperature``). The number of prompts is *not* part of the group (VTAB picks it
per task); the per-task row lists the values seen.

Per task: mean over seeds, sample standard deviation (ddof=1; shown as "-" in Markdown
and left empty in CSV when there is one seed), the number of seeds and the seeds.
Per (benchmark, backbone, method key): the FGVC mean over the 5 datasets, the VTAB-1k
group means (each the mean of its tasks' means) and the 19-task mean (the mean of the
19 task means, not of the group means), each next to the paper's number and the
difference ours - paper. A mean that needs a missing task is missing ("—" in Markdown,
empty in CSV); it is never taken over the tasks present. The separate column
"mean over present k/N" gives that partial mean, labelled as such, for a look at
unfinished sweeps; it is not comparable with the paper.

Runs of other benchmarks (folder, csv, shapes, ...) are listed per task, without paper
columns. Every run given is reported; ``only_final=True`` keeps only runs whose
results.json says ``"final": true`` (a results.json without the key counts as final),
dropping sweep trials.
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

from .paper import (ADE20K_METRICS, FGVC_TASKS, VTAB_GROUP_OF, VTAB_GROUPS, VTAB_TASKS,
                    method_key as _method_key, paper_number)

RESULTS_FILE = "results.json"
MISSING = "—"  # shown in Markdown for a missing value (CSV leaves the cell empty)

REQUIRED_KEYS = ("backbone", "method", "learn_temperature", "prompt_init", "benchmark",
                 "task", "seed", "metrics")

# One CSV row per task row and per summary row; Markdown shows a subset.
CSV_FIELDS = ("section", "benchmark", "backbone", "method", "group", "name", "metric",
              "mean", "std", "n_seeds", "seeds", "num_prompts", "final",
              "paper", "diff", "present", "mean_over_present")

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

    # -- lookups (used by tests and callers that want one number)
    def task(self, benchmark: str, backbone: str, method: str, task: str,
             metric: Optional[str] = None) -> Optional[Dict[str, Any]]:
        for r in self.task_rows:
            if (r["benchmark"], r["backbone"], r["method"], r["name"]) == (benchmark, backbone, method, task) \
                    and (metric is None or r["metric"] == metric):
                return r
        return None

    def summary(self, benchmark: str, backbone: str, method: str, name: str) -> Optional[Dict[str, Any]]:
        for r in self.summary_rows:
            if (r["benchmark"], r["backbone"], r["method"], r["name"]) == (benchmark, backbone, method, name):
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
        which = "final runs only" if self.only_final else "all runs (final and sweep trials)"
        out.append(f"{self.num_runs} runs, {which}. Numbers are test top-1 % (ADE20K: mIoU %); "
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
        """Write ``report.md`` and ``report.csv`` into ``out_dir`` (created); return both paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        md, cs = out_dir / "report.md", out_dir / "report.csv"
        md.write_text(self.markdown(), encoding="utf-8")
        cs.write_text(self.csv(), encoding="utf-8")
        return md, cs


def build_report(runs: Iterable[Dict[str, Any]], only_final: bool = False) -> Report:
    """Group runs into per-task and per-benchmark rows (see the module docstring)."""
    runs = list(runs)
    for i, run in enumerate(runs):
        validate_run(run, run.get("run_dir", f"<run {i}>") if isinstance(run, dict) else f"<run {i}>")
    if only_final:
        runs = [r for r in runs if r.get("final", True)]
    report = Report(num_runs=len(runs), only_final=only_final)

    groups: Dict[Tuple[str, str, str, str], List[Dict[str, Any]]] = {}
    for run in runs:
        key = (run["benchmark"], run["backbone"], run_method_key(run), run["task"])
        groups.setdefault(key, []).append(run)

    # a known benchmark's tasks that no run covers still get a row, shown as missing
    expected = {"fgvc": FGVC_TASKS, "vtab": VTAB_TASKS}
    for benchmark, backbone, mkey, _ in list(groups):
        for task in expected.get(benchmark, ()):
            groups.setdefault((benchmark, backbone, mkey, task), [])

    # per task
    task_means: Dict[Tuple[str, str, str], Dict[str, Optional[float]]] = {}
    for key in sorted(groups, key=lambda k: (_benchmark_sort_key(k[0]), k[1], _method_sort_key(k[2]),
                                             _task_sort_key(k[0], k[3]))):
        benchmark, backbone, mkey, task = key
        members = groups[key]
        seeds = [r["seed"] for r in members]
        dupes = sorted({s for s in seeds if seeds.count(s) > 1})
        if dupes:
            report.notes.append(f"{benchmark}/{backbone}/{mkey}/{task}: seed(s) {dupes} appear more than "
                                f"once, all counted (sweep trials? use only_final): " + ", ".join(r.get("run_dir", "?") for r in members
                                                                   if r["seed"] in dupes))
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
        for metric in primary_metrics(benchmark):
            pairs = [(r["seed"], r["metrics"][metric]) for r in members
                     if r["metrics"].get(metric) is not None]
            values = [v for _, v in pairs]
            mean = _mean(values)
            paper = None
            if benchmark == "fgvc" and task in FGVC_TASKS:
                paper = paper_number("fgvc", backbone, mkey, task)
            elif benchmark == "ade20k":
                paper = paper_number("ade20k", backbone, mkey, metric)
            if benchmark in ("fgvc", "vtab"):
                task_means.setdefault((benchmark, backbone, mkey), {})[task] = mean
            report.task_rows.append({
                "section": "task", "benchmark": benchmark, "backbone": backbone, "method": mkey,
                "group": group, "name": task, "metric": metric,
                "mean": mean, "std": _std(values), "n_seeds": len(values),
                "seeds": " ".join(str(s) for s, _ in sorted(pairs)),
                "num_prompts": " ".join(str(p) for p in prompts), "final": final,
                "paper": paper, "diff": _diff(mean, paper), "present": None, "mean_over_present": None,
            })

    # per (benchmark, backbone, method): FGVC mean, VTAB group means and 19-task mean
    for (benchmark, backbone, mkey), means in task_means.items():
        if benchmark == "fgvc":
            columns = [("mean", "", FGVC_TASKS)]
        elif benchmark == "vtab":
            columns = [(g, g, tasks) for g, tasks in VTAB_GROUPS.items()] + [("mean", "", VTAB_TASKS)]
        else:
            continue
        for name, group, tasks in columns:
            present = [means[t] for t in tasks if means.get(t) is not None]
            full = _mean(present) if len(present) == len(tasks) else None
            paper = paper_number(benchmark, backbone, mkey, name)
            report.summary_rows.append({
                "section": "summary", "benchmark": benchmark, "backbone": backbone, "method": mkey,
                "group": group, "name": name, "metric": "test_top1",
                "mean": full, "std": None, "n_seeds": None, "seeds": "", "num_prompts": "", "final": "",
                "paper": paper, "diff": _diff(full, paper),
                "present": f"{len(present)}/{len(tasks)}", "mean_over_present": _mean(present),
            })
    return report


def write_report(paths, out_dir, only_final: bool = False) -> Report:
    """collect_runs + build_report + Report.write, for ``gapt report``."""
    report = build_report(collect_runs(paths), only_final=only_final)
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
}
_TASK_COLS_PAPER = ("backbone", "method", "task", "ours", "std", "n", "seeds", "prompts", "final", "paper", "diff")
_TASK_COLS_GROUP = ("backbone", "method", "group", "task", "ours", "std", "n", "seeds", "prompts", "final")
_TASK_COLS_SEG = ("backbone", "method", "metric", "ours", "std", "n", "seeds", "prompts", "final", "paper", "diff")
_TASK_COLS_PLAIN = ("backbone", "method", "task", "ours", "std", "n", "seeds", "prompts", "final")
_SUMMARY_COLS = ("backbone", "method", "column", "ours", "paper", "diff", "present", "partial")


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
