"""What a tuned model learned: ``gapt analyze gates``, and what every analysis module shares.

- :func:`analyze_gates`: per block the gate g_l, the selection ratio r_l (SPEC §2) and the
  temperature tau_l of one or more runs: a Markdown table (gates.md), the exact numbers
  (gates.json) and a bar chart in the style of the paper's Fig. 4 (gates.png). A run without
  gates but with learned temperatures shows its temperatures only; a run with neither is an
  error naming it.

The other analyses are modules of their own: :mod:`.analysis_attention` (Fig. 5),
:mod:`.analysis_insertion` (Fig. 1), :mod:`.analysis_reconstruct` (Figs. 2, 9-11),
:mod:`.analysis_ablation` (Figs. 6, 8), :mod:`.analysis_tokens` (Fig. 7).
Figures are drawn on matplotlib's Agg canvas directly (pyplot's global state is left alone).
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

log = logging.getLogger("gapt")

PathLike = Union[str, Path]


# -- shared -----------------------------------------------------------------------------------
def run_labels(runs: Sequence[PathLike]) -> List[str]:
    """Each run's folder name; where two runs share a name, as many trailing path parts as make them differ."""
    paths = [Path(r).resolve() for r in runs]
    depth = 1
    while True:
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels) or depth >= max(len(p.parts) for p in paths):
            return labels
        depth += 1


def _new_figure(width: float, height: float, dpi: int = 110):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _fmt(x: Optional[float], digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}f}"


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
    from .gates_plot import gates_table, plot_gates

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
    md = _write_text(out_dir / "gates.md", table)

    def finite(v):  # standard JSON: NaN (no gates, so no inserted-prompt weight) -> null
        return None if isinstance(v, float) and math.isnan(v) else v
    # Fig. 4: with several tasks or backbones, also one panel per task (see analysis_gates)
    from .analysis_gates import plot_selection_panels, run_identity, selection_panels
    identities = [run_identity(run) for run in runs]
    panels = selection_panels(entries, identities)
    png_tasks = None
    if panels and len({(i["task"], i["backbone"]) for i in identities}) > 1:
        png_tasks = plot_selection_panels(panels, out_dir / "gates_tasks.png")
    js = _write_text(out_dir / "gates.json", json.dumps(
        {"runs": [{"label": label, "run": str(run), **ident, **{k: finite(v) for k, v in values.items()}}
                  for (label, values), run, ident in zip(entries, runs, identities)],
         "panels": panels}, indent=2) + "\n")
    return {"entries": entries, "table": table, "png": png, "md": md, "json": js, "png_tasks": png_tasks}


def parse_blocks(text: str) -> List[int]:
    """``"1,2,5"`` or ``"1-4,6"`` -> sorted distinct block numbers."""
    blocks = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        try:
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if lo > hi:
                    raise ValueError
                blocks.update(range(lo, hi + 1))
            else:
                blocks.add(int(part))
        except ValueError:
            raise ValueError(f"--blocks: cannot read {part!r}; give block numbers like 1,2,5 or 1-4") from None
    if not blocks:
        raise ValueError("--blocks: no block numbers given")
    return sorted(blocks)
