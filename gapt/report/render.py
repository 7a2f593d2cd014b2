"""The report as Markdown and CSV: report.md and report.csv, one section per table."""
from __future__ import annotations

import csv as _csv
import io
from typing import Any, Dict, List, Optional, Sequence

from ..paper.selection import describe
from .collect import _SUMMARY_LABELS, CSV_FIELDS, MISSING, _benchmark_sort_key


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
    "last": ("ours (last epoch)", lambda r: _fmt(r.get("mean_last_epoch"))),
    "std": ("std", _fmt_std),
    "n": ("n", lambda r: str(r["n_seeds"])),
    "seeds": ("seeds", lambda r: r["seeds"] or MISSING),
    "final": ("final", lambda r: r["final"] or MISSING),
    "prompts": ("prompts", lambda r: r["num_prompts"] or MISSING),
    "paper": ("paper", lambda r: _fmt(r["paper"])),
    "diff": ("diff", lambda r: _fmt(r["diff"], signed=True)),
    "diff_last": ("diff (last epoch − paper)", lambda r: _fmt(r["diff"], signed=True)),
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


def _with_select(cols: Sequence[str], select: str) -> List[str]:
    """Under --select best-val, "ours" is the best-val epoch's and the paper columns sit beside a column of
    ours at the last epoch (the paper's protocol): both are named, never mixed."""
    if select == "last" or "paper" not in cols:
        return list(cols)
    out = []
    for c in cols:
        out += ["last", "paper"] if c == "paper" else ["diff_last"] if c == "diff" else [c]
    return out


def _md_section(title: str, rows: List[Dict[str, Any]], cols: Sequence[str], select: str = "last") -> List[str]:
    lines = [f"## {title}", ""]
    if not rows:
        return lines + ["(none)", ""]
    names = {}
    if any(r["metric"] == "test_top1" for r in rows):  # segmentation: mIoU of the last iteration, no choice
        cols = _with_select(cols, select)
        names = {"ours": "ours (last epoch)" if select == "last" else "ours (best-val epoch)"}
    lines.append("| " + " | ".join(names.get(c, _COL[c][0]) for c in cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_COL[c][1](r).replace("|", "\\|") for c in cols) + " |")
    lines.append("")
    return lines


def report_csv(report) -> str:
    """All rows (task rows, then summary rows) as CSV; missing numbers are empty cells."""
    buf = io.StringIO()
    writer = _csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in report.task_rows + report.summary_rows:
        writer.writerow({k: _csv_cell(r.get(k)) for k in CSV_FIELDS})
    return buf.getvalue()

def report_markdown(report) -> str:
    out: List[str] = ["# gapt report", ""]
    which = "final runs and sweep trials" if not report.only_final else "final runs" + (
        f" ({report.trials_left_out} sweep trial(s) left out; --include-trials shows them)"
        if report.trials_left_out else "")
    select = getattr(report, "select", "last")
    out.append(f"{report.num_runs} runs, {which}. A row pools only runs that differ in seed alone; "
               f"\"settings\" says what they are. Numbers are {describe(select)} (ADE20K: mIoU % of the last "
               f"iteration); "
               f"ours = mean over seeds, std = sample std over seeds (ddof=1; \"-\" when there is one seed), "
               f"n = number of seeds. "
               f"\"{MISSING}\" marks a missing task, and any mean that needs it is missing too. "
               + ("diff = ours − paper." if select == "last" else
                  "the paper columns compare the paper with ours (last epoch), the protocol the paper used: "
                  "diff = ours (last epoch) − paper."))
    out.append("")
    for note in report.notes:
        out.append(f"> note: {note}")
    if report.notes:
        out.append("")
    benchmarks = sorted({r["benchmark"] for r in report.task_rows}, key=_benchmark_sort_key)
    for b in benchmarks:
        tasks = [r for r in report.task_rows if r["benchmark"] == b]
        sums = [r for r in report.summary_rows if r["benchmark"] == b]
        if b == "fgvc":
            out += _md_section("FGVC — per dataset", tasks, _TASK_COLS_PAPER, select)
            out += _md_section("FGVC — mean over the 5 datasets", sums, _SUMMARY_COLS, select)
        elif b == "vtab":
            out += _md_section("VTAB-1k — per task", tasks, _TASK_COLS_GROUP)
            out += _md_section("VTAB-1k — group means and 19-task mean", sums, _SUMMARY_COLS, select)
        elif b == "ade20k":
            out += _md_section("ADE20K — mIoU (single-scale) and mIoU_ms (multi-scale)",
                               tasks, _TASK_COLS_SEG)
        else:
            out += _md_section(f"{b} — per task (no published numbers)", tasks, _TASK_COLS_PLAIN)
    if not benchmarks:
        out.append("No runs.")
        out.append("")
    return "\n".join(out)
