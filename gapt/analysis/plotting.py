"""What every analysis figure shares: run labels, an Agg figure, PNG and text writers, number format.

Figures are drawn on matplotlib's Agg canvas directly (pyplot's global state is left alone).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence, Union

PathLike = Union[str, Path]

def run_labels(runs: Sequence[PathLike]) -> List[str]:
    """Each run's folder name; where two runs share a name, as many trailing path parts as make them differ."""
    paths = [Path(r).resolve() for r in runs]
    depth = 1
    while True:
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels) or depth >= max(len(p.parts) for p in paths):
            return labels
        depth += 1

def new_figure(width: float, height: float, dpi: int = 110):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig

def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path

def fmt(x: Optional[float], digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}f}"

def save_png(fig, out_png) -> Path:
    """Lay out ``fig`` and write it as a PNG, creating the folder; returns the path."""
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png
