"""``gapt analyze ablation RUNS...``: VPT-shallow -> + GATE -> + GATE + LT, per backbone (Figs. 6 and 8).

Reads finished runs (results.json) and draws bars per backbone for the three steps:
``ablation.png`` on the benchmark means (FGVC mean over its 5 tasks, VTAB-1k mean over its 19,
ADE20K mIoU; Fig. 6) and ``ablation_tasks.png`` per dataset (Fig. 8), with the paper's number
marked on a bar wherever SPEC §7 prints one (VPT-shallow and Ours for FGVC / VTAB-1k;
VPT-shallow and gated for ADE20K). A benchmark mean is drawn only when every task of the
benchmark has a run; otherwise the JSON gives the mean over the tasks present and says which
are missing. ``ablation.json`` holds every plotted number and the runs behind it;
``ablation.md`` the same as tables.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .plotting import fmt, new_figure, write_text
from .runs import group, load_runs, mean_over_seeds

# (method key, label): the ablation's steps, in order
STEPS = (("vpt-shallow", "VPT-shallow"), ("gated", "+ GATE"), ("gated+temperature", "+ GATE + LT"))
BENCH_LABEL = {"fgvc": "FGVC mean", "vtab": "VTAB-1k mean", "ade20k": "ADE20K mIoU"}

def _key(run) -> str:
    from ..report.tables import run_method_key
    return run_method_key(run)

def ablation_numbers(runs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """{"tasks": [...], "benchmarks": [...]} rows: benchmark, task, backbone, step, value, n, paper, runs."""
    from ..paper.published import FGVC_TASKS, VTAB_TASKS, paper_number
    keys = {k for k, _ in STEPS}
    runs = [r for r in runs if _key(r) in keys]
    if not runs:
        raise ValueError("no VPT-shallow, gated or gated+temperature runs among the given folders "
                         "(the ablation compares method=vpt-shallow, method=gated, and method=gated "
                         "learn_temperature=true)")
    tasks = []
    for (bench, task, backbone, mkey), members in sorted(group(runs, lambda r: (r["benchmark"], r["task"], r["backbone"],
                                                                                _key(r))).items()):
        m = mean_over_seeds(members)
        paper = None
        if bench == "fgvc" and task in FGVC_TASKS:
            paper = paper_number("fgvc", backbone, mkey, task)
        elif bench == "ade20k":
            paper = paper_number("ade20k", backbone, mkey, "mIoU")
        tasks.append({"benchmark": bench, "task": task, "backbone": backbone, "step": mkey, "value": m["value"],
                      "n": m["n"], "paper": paper, "runs": m["runs"]})
    benchmarks = []
    expected = {"fgvc": FGVC_TASKS, "vtab": VTAB_TASKS}
    for (bench, backbone, mkey), rows in sorted(group(tasks, lambda t: (t["benchmark"], t["backbone"], t["step"])).items()):
        if bench == "ade20k":
            for r in rows:  # one task; its mIoU is the benchmark's number
                benchmarks.append({**{k: r[k] for k in ("benchmark", "backbone", "step", "value", "paper")},
                                   "tasks_present": [r["task"]], "tasks_missing": []})
            continue
        if bench not in expected:
            continue
        present = [r for r in rows if r["task"] in expected[bench] and r["value"] is not None]
        missing = [t for t in expected[bench] if t not in {r["task"] for r in present}]
        mean_present = sum(r["value"] for r in present) / len(present) if present else None
        benchmarks.append({"benchmark": bench, "backbone": backbone, "step": mkey,
                           "value": None if missing else mean_present, "mean_over_present": mean_present,
                           "tasks_present": [r["task"] for r in present], "tasks_missing": missing,
                           "paper": paper_number(bench, backbone, mkey, "mean")})
    return {"tasks": tasks, "benchmarks": benchmarks}

def _bars(ax, rows: List[Dict[str, Any]], backbones: List[str], title: str, value_key: str = "value") -> None:
    """Grouped bars: a group per backbone, a bar per step; the paper's number as a black marker."""
    import numpy as np
    width = 0.8 / len(STEPS)
    colours = ("#9e9e9e", "#4c8bd6", "#d6604c")
    paper_drawn = False
    for s, ((mkey, label), colour) in enumerate(zip(STEPS, colours)):
        xs, ys, ps = [], [], []
        for b, backbone in enumerate(backbones):
            hit = [r for r in rows if r["backbone"] == backbone and r["step"] == mkey]
            x = b + (s - (len(STEPS) - 1) / 2) * width
            y = hit[0][value_key] if hit and hit[0][value_key] is not None else np.nan
            xs.append(x)
            ys.append(y)
            ps.append(hit[0]["paper"] if hit and hit[0].get("paper") is not None else np.nan)
        bars = ax.bar(xs, ys, width, color=colour, label=label if ax.get_legend_handles_labels()[1].count(label) == 0
                      else None)
        for bar, y, backbone in zip(bars, ys, backbones):
            hit = [r for r in rows if r["backbone"] == backbone and r["step"] == mkey]
            star = "*" if hit and not hit[0].get("complete", True) else ""
            if np.isfinite(y):
                ax.text(bar.get_x() + bar.get_width() / 2, y, f"{y:.1f}{star}\n", ha="center", va="top",
                        fontsize=6, color="white", fontweight="bold")
        if np.isfinite(ps).any():
            ax.plot(xs, ps, "k_", markersize=14, markeredgewidth=2,
                    label="paper" if not paper_drawn else None)
            ax.plot(xs, ps, "kx", markersize=4)
            paper_drawn = True
    ax.set_xticks(range(len(backbones)))
    ax.set_xticklabels(backbones, fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    finite = [v for r in rows for v in (r.get(value_key), r.get("paper")) if v is not None]
    if finite:
        lo, hi = min(finite), max(finite)
        ax.set_ylim(max(0.0, lo - 0.15 * (hi - lo + 5)), hi + 0.15 * (hi - lo + 5))

def plot_ablation(rows: List[Dict[str, Any]], panels: List[str], panel_key: str, out_png, title: str,
                  value_key: str = "value") -> Path:
    cols = min(len(panels), 4)
    nrows = (len(panels) + cols - 1) // cols
    fig = new_figure(max(6.5, 3.3 * cols + 0.4), 2.9 * nrows + 0.9)
    axes = fig.subplots(nrows, cols, squeeze=False)
    for i, panel in enumerate(panels):
        ax = axes[i // cols, i % cols]
        sel = [r for r in rows if r[panel_key] == panel]
        backbones = list(dict.fromkeys(r["backbone"] for r in sel))
        _bars(ax, sel, backbones, BENCH_LABEL.get(panel, panel) if panel_key == "benchmark" else panel, value_key)
        if i % cols == 0:
            ax.set_ylabel("top-1 / mIoU (%)", fontsize=8)
    for j in range(len(panels), nrows * cols):
        axes[j // cols, j % cols].set_visible(False)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    h, lines = fig.get_figheight(), title.count("\n") + 1
    fig.suptitle(title, fontsize=9, y=1 - 0.08 / h, va="top")  # in inches from the top: figures of any height
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 1 - (0.12 + 0.18 * lines) / h),
               fontsize=7, ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.45 + 0.18 * lines) / h))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")  # not save_png: its tight_layout would drop the legend's room
    return out_png

def ablation_table(numbers: Dict[str, Any]) -> str:
    lines = ["| benchmark | backbone | step | ours | paper | tasks missing |", "|---|---|---|---|---|---|"]
    label = dict(STEPS)
    for r in numbers["benchmarks"]:
        ours = fmt(r["value"]) if r["value"] is not None else \
            (f"({fmt(r.get('mean_over_present'))} over {len(r['tasks_present'])})" if r.get("mean_over_present") else "—")
        lines.append(f"| {BENCH_LABEL.get(r['benchmark'], r['benchmark'])} | {r['backbone']} | {label[r['step']]} | "
                     f"{ours} | {fmt(r['paper'])} | {', '.join(r['tasks_missing']) or '—'} |")
    lines += ["", "| benchmark | task | backbone | step | ours | seeds | paper |", "|---|---|---|---|---|---|---|"]
    for r in numbers["tasks"]:
        lines.append(f"| {r['benchmark']} | {r['task']} | {r['backbone']} | {label[r['step']]} | {fmt(r['value'])} | "
                     f"{r['n']} | {fmt(r['paper'])} |")
    return "\n".join(lines) + "\n"

def analyze_ablation(paths: Sequence, out: Optional[str] = None, include_trials: bool = False) -> Dict[str, Any]:
    """Figs. 6 and 8 from run folders; writes ablation.png, ablation_tasks.png, ablation.json, ablation.md."""
    return ablation_figures(load_runs(paths, include_trials), out)

def ablation_figures(runs: Sequence[Dict[str, Any]], out: Optional[str] = None) -> Dict[str, Any]:
    """Figs. 6 and 8 from results.json dicts (see :func:`analyze_ablation`)."""
    numbers = ablation_numbers(runs)
    out_dir = Path(out or "analysis")
    res: Dict[str, Any] = {"numbers": numbers}
    order = [b for b in ("fgvc", "vtab", "ade20k") if any(r["benchmark"] == b for r in numbers["benchmarks"])]
    for r in numbers["benchmarks"]:  # an incomplete benchmark is drawn as the mean over its tasks present, starred
        r["plotted"] = r["value"] if r["value"] is not None else r.get("mean_over_present")
        r["complete"] = r["value"] is not None
    if order:
        incomplete = not all(r["complete"] for r in numbers["benchmarks"])
        res["png"] = plot_ablation(numbers["benchmarks"], order, "benchmark", out_dir / "ablation.png",
                                   "Ablation: VPT-shallow -> + GATE -> + GATE + LT (benchmark means)"
                                   + ("\n* = benchmark incomplete: mean over the tasks present" if incomplete else ""),
                                   value_key="plotted")
    task_rows = [{**r, "panel": f"{r['benchmark']}: {r['task']}"} for r in numbers["tasks"]]
    from ..paper.published import FGVC_TASKS, VTAB_TASKS
    order_of = {("fgvc", t): i for i, t in enumerate(FGVC_TASKS)}
    order_of.update({("vtab", t): 10 + i for i, t in enumerate(VTAB_TASKS)})
    task_rows.sort(key=lambda r: (order_of.get((r["benchmark"], r["task"]), 100), r["benchmark"], r["task"]))
    panels = list(dict.fromkeys(r["panel"] for r in task_rows))
    res["png_tasks"] = plot_ablation(task_rows, panels, "panel", out_dir / "ablation_tasks.png",
                                     "Ablation per dataset: VPT-shallow -> + GATE -> + GATE + LT")
    res["table"] = ablation_table(numbers)
    res["md"] = write_text(out_dir / "ablation.md", res["table"])
    res["json"] = write_text(out_dir / "ablation.json", json.dumps(numbers, indent=2) + "\n")
    return res

# -- `gapt reproduce fig6` / `fig8` --------------------------------------------------------------
def plan_fig6(name: str = "fig6"):
    """The ablation's runs: per backbone (MAE, MoCo v3) and dataset (FGVC 5, VTAB-1k 19, ADE20K): VPT-shallow
    (the tables' baseline settings, lr searched on val), + GATE (Table 5's settings, learn_temperature=false)
    and + GATE + LT (Table 5's settings, learn_temperature=true: Ours on FGVC / VTAB-1k; ADE20K's Ours is the
    + GATE step). Rendered by :func:`render_ablation`."""
    from ..paper.plans import Plan, RunSpec, plan_table1, plan_table2, plan_table3
    specs = []
    for table in (plan_table1(), plan_table2(), plan_table3()):
        for s in table.specs:
            if s.method == "vpt-shallow":
                specs.append(s)
            elif s.method.startswith("gated") and s.gate_type == "soft":
                # Ours is gated + LT on FGVC / VTAB-1k and plain gated on ADE20K (Table 3): both steps set explicitly
                specs.append(RunSpec(**{**s.__dict__, "row": "+ GATE + LT", "method": "gated+temperature",
                                        "overrides": list(s.overrides) + ["learn_temperature=true"]}))
                specs.append(RunSpec(**{**s.__dict__, "name": s.name.replace("/ours/", "/gate/"), "row": "+ GATE",
                                        "method": "gated", "overrides": list(s.overrides) + ["learn_temperature=false"]}))
    title = ("Fig. 6: ablation VPT-shallow -> + GATE -> + GATE + LT (benchmark means)" if name == "fig6" else
             "Fig. 8: the ablation per dataset")
    return Plan(name, title, specs, render=render_ablation,
                notes=["+ GATE: Table 5's settings with learn_temperature=false, + GATE + LT with true (the paper "
                       "gives neither its own settings)"])

def plan_fig8():
    return plan_fig6("fig8")

def render_ablation(plan, results, out_dir) -> List[Path]:
    runs = [r for rs in results.values() for r in rs]
    if not runs:
        raise ValueError(f"{plan.name}: no finished runs under {out_dir} yet")
    res = ablation_figures(runs, Path(out_dir) / "figures")
    return [res["md"], res["json"]] + ([res["png"]] if res.get("png") else []) + [res["png_tasks"]]
