"""A plan's results as the paper's table: ours (mean over seeds), the paper's number and the difference, as Markdown and CSV.

Ours is the test top-1 of the last epoch, the protocol the paper used (SPEC §6; gapt.paper.selection);
the CSV also has ``ours_best_val``, the best held-out-val epoch's, clearly named and never in the diff."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import published as P
from .plans import Plan, RunSpec
from .runner import spec_results
from .selection import describe, metric_value


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
        best_val: Dict[str, Optional[float]] = {}
        seeds_by_task: Dict[str, List[int]] = {}
        tuned, backbone_params = {}, None
        for s in specs:
            runs = results.get(s.name, [])
            per_task[s.task] = {m: _mean([v for v in (metric_value(r, m, "last") for r in runs) if v is not None])
                                for m in s.metrics}
            best_val[s.task] = _mean([v for v in (metric_value(r, "test_top1", "best-val") for r in runs)
                                      if v is not None]) if "test_top1" in s.metrics else None
            seeds_by_task[s.task] = [r.get("seed") for r in runs]
            if runs and runs[0].get("tuned_params") is not None:
                tuned[s.task] = runs[0]["tuned_params"]
                backbone_params = runs[0].get("backbone_params", backbone_params)
        cells = {}

        def over(col: str, values: Dict[str, Optional[float]]) -> Optional[float]:
            covered = P.VTAB_GROUPS.get(col) or (table.tasks if col == "mean" else ())
            vals = [values.get(t) for t in covered]
            return _mean(vals) if vals and all(v is not None for v in vals) else None
        for col in table.columns:
            metric = _paper_metric(table.benchmark, col)
            if table.benchmark == "ade20k":
                ours = per_task.get("ade20k", {}).get(metric)
            elif col in per_task:
                ours = per_task[col][metric]
            else:
                ours = over(col, {t: v.get(metric) for t, v in per_task.items()})
            ref = paper_row.values.get(col) if paper_row else None
            bv = None if table.benchmark == "ade20k" else best_val.get(col) if col in per_task else over(col, best_val)
            cells[col] = {"ours": ours, "paper": ref, "diff": None if ours is None or ref is None else ours - ref,
                          "ours_best_val": bv}
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
    unit = "mIoU % of the last iteration" if table.benchmark == "ade20k" else f"%: {describe('last')}"
    md = [f"# {plan.name}: {table.title}", "",
          f"Each cell: ours (mean over seeds) / paper (ours − paper), {unit}. \"—\" marks a run or a "
          f"paper number that is missing; a mean column needs every dataset it covers."
          + ("" if table.benchmark == "ade20k" else f" {plan.name}.csv also gives ours at the best held-out-val "
             f"epoch (ours_best_val), which no diff uses."), ""]
    md += [f"> {n}" for n in list(table.notes) + list(plan.notes)]
    md.append("")
    head = ["backbone", "row", "gate", "prompts", "seeds"] + list(table.columns)
    if with_params:
        head.append("total params")
    md.append("| " + " | ".join(head) + " |")
    md.append("|" + "---|" * len(head))
    csv_lines = ["table,backbone,row,method,gate_type,num_prompts,column,ours,paper,diff,seeds,ours_best_val"]
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
        extra = [("total_params", r["total_params"], r["paper_total_params"], None)] if with_params else []
        for col, ours, ref, bv in [(c, v["ours"], v["paper"], v["ours_best_val"]) for c, v in r["cells"].items()] \
                + extra:
            diff = None if ours is None or ref is None else ours - ref
            csv_lines.append(",".join([plan.name, r["backbone"], _csv(r["row"]), r["method"], r["gate_type"],
                                       str(r["num_prompts"] or ""), col, _num(ours), _num(ref), _num(diff),
                                       " ".join(map(str, r["seeds"])), _num(bv)]))
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
