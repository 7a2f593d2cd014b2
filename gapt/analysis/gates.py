"""What a tuned model learned: ``gapt analyze gates`` (Fig. 4).

- :func:`analyze_gates`: per block the gate g_l, the selection ratio r_l (SPEC §2) and the
  temperature tau_l of one or more runs: a Markdown table (gates.md), the exact numbers
  (gates.json) and a bar chart in the style of the paper's Fig. 4 (gates.png). A run without
  gates but with learned temperatures shows its temperatures only; a run with neither is an
  error naming it.

- Fig. 4 (``gates_tasks.png``): with runs of several tasks or backbones, the selection ratio r_l of
  each in one panel per task (:func:`selection_panels`, :func:`plot_selection_panels`), and its
  `gapt reproduce fig4` plan.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .gates_plot import gates_table, plot_gates
from .plotting import PathLike, new_figure, run_labels, save_png, write_text

log = logging.getLogger("gapt")

# -- gates ------------------------------------------------------------------------------------
def gate_values(run_dir: PathLike) -> Dict[str, Any]:
    """Gates, selection ratios and temperatures of a finished run (classification or
    segmentation), read from its tuned file.

    Only the tuned tensors are read (no backbone checkpoint is needed). For a gated run this is
    :func:`gapt.model.selection.selection_ratio` of the tuned (best-val) state plus ``method``;
    a run with learned temperatures but no gates gets empty gate lists and
    ``inserted_prompt_weight`` NaN. A run with neither raises ValueError naming it.
    """
    from types import SimpleNamespace

    from ..engine import runfolder as rf
    from ..model.selection import selection_ratio
    from ..model.tuned import read_encoder_tuned

    run = Path(run_dir)
    tuned = run / rf.TUNED
    if not tuned.is_file():
        raise rf.RunFolderError(f"{run_dir} has no {rf.TUNED} (not a gapt run folder, or the run is not finished)")
    meta, tensors = read_encoder_tuned(str(tuned))  # classification and segmentation runs alike
    gate_logits, temperature = tensors.get("gate_logits"), tensors.get("temperature")
    method = meta.get("method", "?")
    if gate_logits is None and temperature is None:
        raise ValueError(f"run {run_dir} (method '{method}') has no gates and no learned temperatures: "
                         f"`gapt analyze gates` needs a gated run (method=gated) or learn_temperature=true")
    if gate_logits is not None:
        values = selection_ratio(SimpleNamespace(gate_logits=gate_logits, temperature=temperature, method=method))
    else:
        values = {"gate": [], "block_weight": [], "selection_ratio": [], "inserted_prompt_weight": float("nan"),
                  "temperature": temperature.detach().clamp(0.01, 10.0).tolist()}
    values["method"] = method
    values["learn_temperature"] = temperature is not None
    values["depth"] = meta.get("depth")
    return values

def analyze_gates(runs: Sequence[PathLike], out: Optional[PathLike] = None) -> Dict[str, Any]:
    """Table (gates.md, also returned), numbers (gates.json) and chart (gates.png) for ``runs``.

    ``out`` defaults to ``<run>/analysis`` for one run and ``analysis`` for several.
    Returns ``{"entries": [(label, values)], "table": str, "png": Path, "md": Path, "json": Path}``.
    """
    runs = list(runs)
    if not runs:
        raise ValueError("no run folders given")
    out_dir = Path(out) if out else (Path(runs[0]) / "analysis" if len(runs) == 1 else Path("analysis"))
    entries = []
    for label, run in zip(run_labels(runs), runs):
        values = gate_values(run)
        entries.append((label if values["gate"] else f"{label} (no gates)", values))
    # A run without gates is drawn and tabulated with NaN gates (no bar, "—" in the table) so that it keeps
    # its own colour in the legend; gates.json keeps its empty gate lists.
    shown = [(label, values if values["gate"] else
              {**values, "gate": [float("nan")] * (len(values["temperature"]) - 1),
               "selection_ratio": [float("nan")] * (len(values["temperature"]) - 1)})
             for label, values in entries]
    table = gates_table(shown)
    png = plot_gates(shown, out_dir / "gates.png")
    md = write_text(out_dir / "gates.md", table)

    def finite(v):  # standard JSON: NaN (no gates, so no inserted-prompt weight) -> null
        return None if isinstance(v, float) and math.isnan(v) else v
    # Fig. 4: with several tasks or backbones, also one panel per task
    identities = [run_identity(run) for run in runs]
    panels = selection_panels(entries, identities)
    png_tasks = None
    if panels and len({(i["task"], i["backbone"]) for i in identities}) > 1:
        png_tasks = plot_selection_panels(panels, out_dir / "gates_tasks.png")
    js = write_text(out_dir / "gates.json", json.dumps(
        {"runs": [{"label": label, "run": str(run), **ident, **{k: finite(v) for k, v in values.items()}}
                  for (label, values), run, ident in zip(entries, runs, identities)],
         "panels": panels}, indent=2) + "\n")
    return {"entries": entries, "table": table, "png": png, "md": md, "json": js, "png_tasks": png_tasks}

# -- Fig. 4: the selection ratio of several tasks and backbones in one figure ---------------------
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
    fig = new_figure(max(4.0, 3.6 * cols), 3.4)
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
    from ..paper.plans import Plan, plan_table1, plan_table3
    specs = [s for s in plan_table1().specs if s.method.startswith("gated") and s.task in ("nabirds", "cars")]
    specs += [s for s in plan_table3().specs if s.method.startswith("gated")]
    return Plan("fig4", "Fig. 4: selection ratio per block, NABirds, Stanford Cars and ADE20K", specs,
                render=render_fig4)

def render_fig4(plan, results, out_dir) -> List[Path]:
    runs = [str(p.parent) for s in plan.specs for p in sorted((Path(out_dir) / s.name / "final").glob("seed*/tuned.safetensors"))[:1]]
    if not runs:
        raise ValueError(f"{plan.name}: no finished runs under {out_dir} yet")
    res = analyze_gates(runs, Path(out_dir) / "figures")
    return [res["md"], res["json"], res["png"]] + ([res["png_tasks"]] if res.get("png_tasks") else [])
