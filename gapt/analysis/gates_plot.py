"""Plot and tabulate what gated prompt tuning learned: gates, selection ratios, temperatures.

Each entry is ``(label, values)`` with ``values`` as returned for one trained model::

    {"gate": [g_1 .. g_{L-1}],                 # sigmoid of the gate logits
     "selection_ratio": [r_1 .. r_{L-1}],      # SPEC section 2, from gapt.selection_ratio(model)
     "inserted_prompt_weight": float,          # prod_k (1 - g_k), the weight left on P
     "temperature": [tau_1 .. tau_L] or None}  # None when the temperature was not learned

Nothing is computed here; the numbers are plotted and printed as given. The figure is
drawn on matplotlib's Agg canvas directly, so it never touches pyplot's global backend.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .plotting import save_png

Entry = Tuple[str, Dict[str, Any]]

def _check(entries: Sequence[Entry]) -> List[Tuple[str, List[float], List[float], float, Optional[List[float]]]]:
    if not entries:
        raise ValueError("no gate entries to show")
    out = []
    for i, entry in enumerate(entries):
        try:
            label, values = entry
        except (TypeError, ValueError):
            raise ValueError(f"entry {i}: expected (label, dict), got {entry!r}") from None
        for key in ("gate", "selection_ratio", "inserted_prompt_weight"):
            if key not in values:
                raise ValueError(f"entry {label!r}: missing key {key!r}")
        gate = [float(g) for g in values["gate"]]
        ratio = [float(r) for r in values["selection_ratio"]]
        if len(gate) != len(ratio):
            raise ValueError(f"entry {label!r}: {len(gate)} gates but {len(ratio)} selection ratios "
                             f"(both are one per block except the last)")
        temp = values.get("temperature")
        temp = None if temp is None else [float(t) for t in temp]
        out.append((str(label), gate, ratio, float(values["inserted_prompt_weight"]), temp))
    return out

def _num(x: Optional[float]) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.4g}"

def gates_table(entries: Sequence[Entry]) -> str:
    """A Markdown table: one row per block (1-based), per run the gate g_l, the selection
    ratio r_l and the temperature tau_l; the last block has a temperature but no gate.
    A final row gives each run's inserted-prompt weight prod(1 - g_k) in its gate column.
    Numbers are printed with 4 significant digits; "—" where a run has no value."""
    runs = _check(entries)
    num_blocks = max(max(len(g) + 1, len(t) if t else 0) for _, g, _, _, t in runs)
    header = ["block"]
    for label, *_ in runs:
        label = label.replace("|", "\\|")
        header += [f"{label} gate", f"{label} r_l", f"{label} temperature"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for b in range(num_blocks):
        cells = [str(b + 1)]
        for _, gate, ratio, _, temp in runs:
            cells.append(_num(gate[b]) if b < len(gate) else "—")
            cells.append(_num(ratio[b]) if b < len(ratio) else "—")
            cells.append(_num(temp[b]) if temp is not None and b < len(temp) else "—")
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["inserted prompt weight ∏(1−g)"]
    for _, _, _, weight, _ in runs:
        cells += [_num(weight), "—", "—"]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

def plot_gates(entries: Sequence[Entry], out_png: Union[str, Path]) -> Path:
    """Write a PNG: selection ratio per block as grouped bars (one colour per run, paper
    Fig. 4 style), the inserted-prompt weight in each run's legend entry, and a second
    panel with the per-block temperatures when any run has them. Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = _check(entries)
    has_temp = any(t is not None for *_, t in runs)
    num_gated = max(len(g) for _, g, *_ in runs)
    num_blocks = max(max(len(g) + 1, len(t) if t else 0) for _, g, _, _, t in runs)
    width = 0.8 / len(runs)

    fig = Figure(figsize=(max(6.0, 0.6 * num_blocks + 2.0), 7.0 if has_temp else 3.8), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if has_temp else 1, 1, squeeze=False)[:, 0]

    ax = axes[0]
    for i, (label, _, ratio, weight, _) in enumerate(runs):
        xs = [b + 1 + (i - (len(runs) - 1) / 2) * width for b in range(len(ratio))]
        ax.bar(xs, ratio, width=width, color=f"C{i % 10}", label=f"{label} (inserted prompt weight {weight:.4g})")
    ax.set_xticks(range(1, num_gated + 1))
    ax.set_xlim(0.4, num_blocks + 0.6)
    ax.set_xlabel("block l")
    ax.set_ylabel("selection ratio r_l")
    ax.set_title("Influence of each block on the prompt entering the last block")
    ax.legend(fontsize="small")

    if has_temp:
        ax = axes[1]
        temp_runs = [(i, r) for i, r in enumerate(runs) if r[4] is not None]
        w = 0.8 / len(temp_runs)
        for j, (i, (label, _, _, _, temp)) in enumerate(temp_runs):
            xs = [b + 1 + (j - (len(temp_runs) - 1) / 2) * w for b in range(len(temp))]
            ax.bar(xs, temp, width=w, color=f"C{i % 10}", label=label)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")  # the initial value
        ax.set_xticks(range(1, num_blocks + 1))
        ax.set_xlim(0.4, num_blocks + 0.6)
        ax.set_xlabel("block l")
        ax.set_ylabel("temperature tau_l")
        ax.set_title("Learned attention temperature per block (1 = initial)")
        ax.legend(fontsize="small")

    return save_png(fig, out_png)
