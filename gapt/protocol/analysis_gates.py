"""Fig. 4 as the paper draws it: the selection ratio r_l of several tasks and backbones in one figure.

``gapt analyze gates`` writes this figure (``gates_tasks.png``) beside its per-run chart whenever
the runs span more than one task or backbone: a panel per task (e.g. NABirds, Stanford Cars,
ADE20K), in each a bar per block and backbone. Each run's task and backbone come from its
results.json (or config.yaml while no results exist). The numbers are the gates.json entries.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from .analyze import _new_figure
from .gates_plot import save_png


def run_identity(run_dir) -> Dict[str, Any]:
    """{"task", "backbone"} of a run folder: results.json first, then config.yaml; '?' where neither says."""
    run = Path(run_dir)
    try:
        res = json.loads((run / "results.json").read_text())
        return {"task": str(res.get("task") or "?"), "backbone": str(res.get("backbone") or "?")}
    except (OSError, ValueError):
        pass
    try:
        from .. import config as C
        cfg = C.load_config(str(run / "config.yaml"), saved=True)
        return {"task": cfg.data.name or cfg.data.format, "backbone": cfg.backbone}
    except Exception:  # noqa: BLE001 - a folder without a readable config: unnamed
        return {"task": "?", "backbone": "?"}


def selection_panels(entries: Sequence[Tuple[str, Dict[str, Any]]], identities: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """[{task, series: [{label, backbone, method, selection_ratio}]}] for gated runs, tasks in the order given."""
    panels: Dict[str, List[Dict[str, Any]]] = {}
    for (label, values), ident in zip(entries, identities):
        if not values["gate"]:
            continue
        panels.setdefault(ident["task"], []).append({
            "label": label, "backbone": ident["backbone"], "method": values.get("method"),
            "selection_ratio": list(values["selection_ratio"])})
    return [{"task": t, "series": s} for t, s in panels.items()]


def plot_selection_panels(panels: Sequence[Dict[str, Any]], out_png) -> Path:
    cols = len(panels)
    fig = _new_figure(max(4.0, 3.6 * cols), 3.4)
    axes = fig.subplots(1, cols, squeeze=False)[0]
    backbones = list(dict.fromkeys(s["backbone"] for p in panels for s in p["series"]))
    for ax, panel in zip(axes, panels):
        series = panel["series"]
        width = 0.8 / len(series)
        for i, s in enumerate(series):
            ratio = s["selection_ratio"]
            xs = [b + 1 + (i - (len(series) - 1) / 2) * width for b in range(len(ratio))]
            same = sum(1 for t in series if t["backbone"] == s["backbone"]) > 1
            ax.bar(xs, ratio, width=width, color=f"C{backbones.index(s['backbone']) % 10}",
                   label=s["backbone"] + (f" ({s['label']})" if same else ""))
        ax.set_xticks(range(1, max(len(s["selection_ratio"]) for s in series) + 1))
        ax.set_xlabel("block l", fontsize=8)
        ax.set_title(panel["task"], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=6.5)
    axes[0].set_ylabel("selection ratio r_l")
    fig.suptitle("Selection ratio per block (which blocks shape the prompt that reaches the last block)", fontsize=9)
    return save_png(fig, out_png)


# -- `gapt reproduce fig4` ---------------------------------------------------------------------
def plan_fig4():
    """Ours (Table 5's settings) on NABirds and Stanford Cars (MAE and MoCo v3) and ADE20K; rendered by
    :func:`render_fig4` as `gapt analyze gates` over the final runs."""
    from .reproduce import Plan, plan_table1, plan_table3
    specs = [s for s in plan_table1().specs if s.method.startswith("gated") and s.task in ("nabirds", "cars")]
    specs += [s for s in plan_table3().specs if s.method.startswith("gated")]
    return Plan("fig4", "Fig. 4: selection ratio per block, NABirds, Stanford Cars and ADE20K", specs,
                render=render_fig4)


def render_fig4(plan, results, out_dir) -> List[Path]:
    from .analyze import analyze_gates
    runs = [str(p.parent) for s in plan.specs for p in sorted((Path(out_dir) / s.name / "final").glob("seed*/tuned.safetensors"))[:1]]
    if not runs:
        raise ValueError(f"{plan.name}: no finished runs under {out_dir} yet")
    res = analyze_gates(runs, Path(out_dir) / "figures")
    return [res["md"], res["json"], res["png"]] + ([res["png_tasks"]] if res.get("png_tasks") else [])
