"""Finished runs as the figure commands read them: results.json files under run folders, grouped, seeds averaged.

Sweep trials (folders under a ``trials/`` directory, or ``final: false`` runs inside a sweep) are
left out unless asked for: they were trained at other learning rates and evaluated on val, and a
figure that averaged them with the chosen runs would mislead. Runs of one group (backbone, method
key, task, prompts) that differ only in seed are averaged; the JSON keeps every run folder.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

PathLike = Union[str, Path]

def is_trial(run: Dict[str, Any]) -> bool:
    """A sweep's trial, as `gapt report` decides it (a plain run under a folder named "trials" is none)."""
    from ..report.collect import is_sweep_trial
    return is_sweep_trial(run)

def load_runs(paths: Iterable[PathLike], include_trials: bool = False) -> List[Dict[str, Any]]:
    """Every valid results.json under ``paths`` (see :func:`gapt.report.tables.collect_runs`), trials dropped."""
    from ..report.tables import collect_runs
    runs = collect_runs(list(paths))
    if not include_trials:
        runs = [r for r in runs if not is_trial(r)]
    if not runs:
        raise ValueError(f"no finished runs (results.json) under {', '.join(map(str, paths))}"
                         + ("" if include_trials else " outside sweep trials/ folders (--include-trials to use them)"))
    return runs

def metric_of(run: Dict[str, Any], metric: Optional[str] = None) -> Optional[float]:
    """The last epoch's test top-1 (what the paper's figures show, as `gapt report`'s paper columns), or
    mIoU for segmentation runs (``metric`` overrides). An old results.json that does not say its last
    epoch's score gives None (left out of the means), never its best-val epoch's in its place."""
    from ..paper.selection import last_epoch_top1
    from ..report.tables import primary_metrics
    name = metric or primary_metrics(run["benchmark"])[0]
    if name == "test_top1":
        return last_epoch_top1(run)
    v = run["metrics"].get(name)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

def mean_over_seeds(runs: Sequence[Dict[str, Any]], metric: Optional[str] = None) -> Dict[str, Any]:
    values = [(r["seed"], metric_of(r, metric), r.get("run_dir")) for r in runs]
    values = [v for v in values if v[1] is not None]
    if not values:
        return {"value": None, "n": 0, "seeds": [], "runs": []}
    return {"value": sum(v for _, v, _ in values) / len(values), "n": len(values),
            "seeds": [s for s, _, _ in values], "runs": [d for _, _, d in values]}

def group(runs: Sequence[Dict[str, Any]], key) -> Dict[Tuple, List[Dict[str, Any]]]:
    out: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in runs:
        out.setdefault(key(r), []).append(r)
    return out
