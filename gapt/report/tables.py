"""Pool runs into report rows: per task (mean over seeds, std, seeds) and per benchmark (FGVC mean,
VTAB-1k group and 19-task means), each beside the paper row it matches."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from ..paper.published import (
    FGVC_TASKS,
    VTAB_GROUP_OF,
    VTAB_GROUPS,
    VTAB_TASKS,
    find_paper_row,
)
from ..paper.selection import DEFAULT_SELECT, SELECTABLE, check_select, metric_value
from .collect import (
    CSV_FIELDS,
    PER_TASK_KEYS,
    _benchmark_sort_key,
    _mean,
    _method_sort_key,
    _std,
    _task_sort_key,
    collect_runs,
    is_sweep_trial,
    primary_metrics,
    run_method_key,
    run_settings,
    settings_text,
    validate_run,
)
from .peers import peers_csv, peers_markdown
from .render import _diff, report_csv, report_markdown


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
    select: str = DEFAULT_SELECT     # which epoch's test top-1 "ours" is (gapt.paper.selection)

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

    # -- output (render.py writes the text)
    def csv(self) -> str:
        """All rows (task rows, then summary rows) as CSV; missing numbers are empty cells."""
        return report_csv(self)

    def peers_csv(self) -> str:
        """The peers section (gapt.report.peers) as CSV with report.csv's columns ('' when no peer method ran)."""
        text = peers_csv(self.summary_rows, CSV_FIELDS)
        return ",".join(CSV_FIELDS) + "\n" + text if text else ""

    def markdown(self) -> str:
        """The tables, then peer methods beside their published numbers (gapt.report.peers, SPEC §12.7)."""
        peers = peers_markdown(self.summary_rows)
        return report_markdown(self) + ("\n" + peers if peers else "")

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
        if self.peers_csv():  # runs of peer methods beside their published numbers (SPEC §12.7)
            (out_dir / "peers.csv").write_text(self.peers_csv(), encoding="utf-8")
        return md, cs


class NoRunsError(ValueError):
    """Nothing to report: no run folder, or only sweep trials left out."""


def _matches(row: Dict[str, Any], settings: Dict[str, Any]) -> bool:
    have = dict(row.get("_settings", ()))
    return all(have.get(k) == v for k, v in settings.items())


def build_report(runs: Iterable[Dict[str, Any]], only_final: bool = True, include_trials: bool = False,
                 select: str = DEFAULT_SELECT) -> Report:
    """Group runs into per-task and per-benchmark rows (see the module docstring).

    Sweep trials (runs in a sweep's ``trials/`` folder, :func:`is_sweep_trial`) are left out unless
    ``include_trials``; ``only_final`` (the default) is kept for callers that pass it;
    ``only_final=False`` includes trials too. ``select``: the epoch whose test top-1 is "ours"
    (``last``, the paper's protocol, or ``best-val``); the paper columns always compare with the
    last epoch (``mean_last_epoch``)."""
    runs = list(runs)
    check_select(select)
    for i, run in enumerate(runs):
        validate_run(run, run.get("run_dir", f"<run {i}>") if isinstance(run, dict) else f"<run {i}>")
    keep_trials = include_trials or not only_final
    trials = [r for r in runs if is_sweep_trial(r)]
    if not keep_trials:
        runs = [r for r in runs if not is_sweep_trial(r)]
    report = Report(num_runs=len(runs), only_final=not keep_trials,
                    trials_left_out=0 if keep_trials else len(trials), select=select)
    unknown = [r.get("run_dir", "?") for r in runs if r["benchmark"] not in ("ade20k", "seg_folder")
               and metric_value(r, SELECTABLE, select) is None]
    if unknown:
        report.notes.append(f"{len(unknown)} run(s) record no test top-1 for the {select} epoch (results.json from "
                            f"before gapt recorded test_top1_last): left out of every row"
                            + ("; --select best-val shows their best-val epoch" if select == "last" else "")
                            + ": " + ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""))

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
            pairs = [(r["seed"], metric_value(r, metric, select)) for r in members]
            pairs = [(s, v) for s, v in pairs if v is not None]
            values = [v for _, v in pairs]
            mean = _mean(values)
            # the paper reports the last epoch: its columns compare with ours at the last epoch
            last = [metric_value(r, metric, "last") for r in members] if select != "last" else values
            mean_last = _mean([v for v in last if v is not None])
            paper = None
            if paper_row is not None and (benchmark == "fgvc" and task in FGVC_TASKS or benchmark == "ade20k"):
                paper = paper_row.values.get(task if benchmark == "fgvc" else metric.lower())
            row = {
                "section": "task", "benchmark": benchmark, "backbone": backbone, "method": mkey,
                "group": group, "name": task, "metric": metric,
                "mean": mean, "std": _std(values), "n_seeds": len(values),
                "seeds": " ".join(str(s) for s, _ in sorted(pairs)),
                "num_prompts": " ".join(str(p) for p in prompts), "final": final,
                "paper": paper, "diff": _diff(mean_last, paper), "present": None, "mean_over_present": None,
                "gate_type": sdict.get("gate_type", ""), "settings": settings_text(settings),
                "paper_table": table if paper is not None else "", "total_params": None,
                "paper_total_params": None, "_settings": settings, "_tuned": tuned, "_backbone_params": bparams,
                "select": select if metric == SELECTABLE else "", "mean_last_epoch": mean_last,
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
        lasts = {t: next((r["mean_last_epoch"] for r in rows if r["mean_last_epoch"] is not None), None)
                 for t, rows in by_task.items()}
        table, paper_row = find_paper_row(benchmark, backbone, mkey, sdict.get("num_prompts"),
                                          sdict.get("gate_type", "soft"))
        for name, group, tasks in columns:
            present = [means[t] for t in tasks if means.get(t) is not None]
            full = _mean(present) if len(present) == len(tasks) and not ambiguous else None
            present_last = [lasts[t] for t in tasks if lasts.get(t) is not None]
            full_last = _mean(present_last) if len(present_last) == len(tasks) and not ambiguous else None
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
                "paper": paper, "diff": _diff(full_last, paper),
                "present": f"{len(present)}/{len(tasks)}", "mean_over_present": _mean(present),
                "gate_type": sdict.get("gate_type", ""), "settings": settings_text(ssettings),
                "paper_table": table if paper is not None else "",
                "total_params": total, "paper_total_params": paper_row.total_params
                if paper_row is not None and name == "mean" else None, "_settings": ssettings,
                "select": select, "mean_last_epoch": full_last,
            })
    return report


def write_report(paths, out_dir, only_final: bool = True, include_trials: bool = False,
                 select: str = DEFAULT_SELECT) -> Report:
    """collect_runs + build_report + Report.write, for ``gapt report`` (NoRunsError when nothing to report)."""
    report = build_report(collect_runs(paths), only_final=only_final and not include_trials,
                          include_trials=include_trials, select=select)
    report.write(out_dir)
    return report


# ----------------------------------------------------------------------------- formatting
