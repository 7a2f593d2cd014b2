"""`gapt sweep --benchmark fgvc|vtab`: one sweep per dataset or task from the shipped presets, in the paper's column order."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import config as C
from .grid import _quote_commas
from .jobs import SweepError, _write_json
from .run import run_sweep

log = logging.getLogger("gapt.sweep")

PRESETS = Path(__file__).resolve().parents[1] / "configs"

def benchmark_tasks(benchmark: str, backbone: str, presets: Optional[Path] = None) -> List[Tuple[str, Path]]:
    """(name, preset file) for every preset of ``benchmark`` and ``backbone``, in the paper's order."""
    from ..tasks import FGVC_TASKS, VTAB_TASKS
    folder = Path(presets or PRESETS) / benchmark / backbone
    if benchmark not in ("fgvc", "vtab"):
        raise SweepError(f"unknown benchmark {benchmark!r}; choose fgvc or vtab")
    if not folder.is_dir():
        have = sorted(p.name for p in folder.parent.iterdir()) if folder.parent.is_dir() else []
        raise SweepError(f"no {benchmark} presets for backbone {backbone!r}; presets exist for {have}")
    files = {p.stem: p for p in folder.glob("*.yaml")}
    order = list(FGVC_TASKS if benchmark == "fgvc" else VTAB_TASKS)
    names = [n for n in order if n in files] + sorted(n for n in files if n not in order)
    return [(n, files[n]) for n in names]

def run_benchmark(benchmark: str, root: str, backbone: str, weights: Optional[str] = None,
                  overrides: Sequence[str] = (), out: Optional[str] = None, tasks: Optional[Sequence[str]] = None,
                  presets: Optional[Path] = None, **sweep_kwargs) -> Dict[str, Any]:
    """A sweep per dataset of FGVC or task of VTAB-1k from the shipped presets, each under out/<name>/.

    FGVC: data.root = root/<the preset's folder name>; VTAB: data.root = root (holding <task>/).
    A dataset whose folder is missing is reported and skipped. Returns benchmark.json's content.
    """
    entries = benchmark_tasks(benchmark, backbone, presets)
    if tasks:
        known = [n for n, _ in entries]
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise SweepError(f"unknown {benchmark} task(s) {unknown}; choose from {known}")
        entries = [(n, p) for n, p in entries if n in tasks]
    user_keys = {o.split("=", 1)[0].strip() for o in overrides}
    if "out" in user_keys:
        raise C.ConfigError("gapt sweep fgvc/vtab: give the benchmark folder with --out, not out=")
    if weights is None and "weights" not in user_keys:
        sample = C.load_config(str(entries[0][1])) if entries else None
        if sample is not None and sample.weights and not Path(sample.weights).exists():
            raise SweepError(f"the presets' weights path {sample.weights} does not exist; give --weights PATH "
                             f"(the {backbone} checkpoint)")
    out_dir = Path(out or f"runs/sweep/{benchmark}-{backbone}")
    summary: Dict[str, Any] = {"benchmark": benchmark, "backbone": backbone, "root": str(root), "tasks": []}
    failed = 0
    for name, preset in entries:
        pre = C.load_config(str(preset))
        data_root = Path(root) / Path(pre.data.root).name if benchmark == "fgvc" else Path(root)
        needed = data_root if benchmark == "fgvc" else Path(root) / name
        entry: Dict[str, Any] = {"name": name, "preset": str(preset), "out": str(out_dir / name)}
        if not needed.is_dir():
            log.warning("%s %s: folder %s not found, skipped", benchmark, name, needed)
            entry.update(status="skipped", reason=f"folder {needed} not found")
            summary["tasks"].append(entry)
            continue
        task_overrides = [f"data.root={_quote_commas(str(data_root))}", f"out={out_dir / name}"]
        if weights is not None:
            task_overrides.append(f"weights={_quote_commas(str(weights))}")
        log.info("=== %s %s (%s) ===", benchmark, name, data_root)
        try:
            state = run_sweep(str(preset), task_overrides + list(overrides), **sweep_kwargs)
            entry.update(status=state["status"], choice=state.get("choice"), final_test_top1=state.get("final_test_top1"))
        except (SweepError, C.ConfigError) as e:
            failed += 1
            log.error("%s %s: %s", benchmark, name, e)
            entry.update(status="failed", error=str(e))
        summary["tasks"].append(entry)
        _write_json(out_dir / "benchmark.json", summary)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "benchmark.json", summary)
    if entries and all(t["status"] == "skipped" for t in summary["tasks"]):
        raise SweepError(f"no {benchmark} dataset folder found under {root} "
                         f"(looked for {', '.join(Path(t['reason'].split()[1]).name for t in summary['tasks'])})")
    for t in summary["tasks"]:
        s = t.get("final_test_top1") or {}
        val = f"{s['mean']:.2f}" if s.get("mean") is not None else "-"
        print(f"{t['name']:22s} {t['status']:14s} final test top-1 {val}  {t.get('reason') or t.get('error') or ''}")
    summary["failed"] = failed
    return summary
