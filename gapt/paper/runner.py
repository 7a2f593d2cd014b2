"""Run a plan through the sweep executors (resumable, reproduce.json) and collect each spec's finished runs."""
from __future__ import annotations

import datetime as _dt
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .. import config as C
from .inputs import check_inputs, parse_weights, spec_jobs, spec_overrides
from .plans import PRESETS, REPRODUCE_FILE, Plan, ReproduceError

log = logging.getLogger("gapt.reproduce")


class _PlanProgress:
    """reproduce.json: every spec's state, rewritten as runs end."""

    def __init__(self, out: Path, plan: Plan):
        self.path = out / REPRODUCE_FILE
        self.state: Dict[str, Any] = {"plan": plan.name, "started": _now(), "specs": {}}

    def set(self, name: str, **rec) -> None:
        self.state["specs"].setdefault(name, {}).update(rec)
        self.write()

    def write(self) -> None:
        from ..sweep.jobs import _write_json
        self.state["updated"] = _now()
        _write_json(self.path, self.state)


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def run_plan(plan: Plan, out, data_root, *, weights: Sequence[str] = (), overrides: Sequence[str] = (),
             seeds: int = 1, backend: str = "local", workers: Optional[int] = None, preload: Sequence[str] = (),
             retry_failed: bool = False, executor=None, ray_options: Optional[dict] = None) -> Dict[str, Any]:
    """Run every spec of ``plan`` under ``out`` (resumable); return reproduce.json's content.

    Specs with published settings run as one batch of final runs on the executor; lr-sweep specs
    run one ``gapt sweep`` each on the same executor. A failed run is recorded (status, error) and
    the plan goes on; ``failed`` in the result lists them.
    """
    from ..sweep.executors import make_executor
    from ..sweep.jobs import SweepError, check_same_run
    from ..sweep.run import _classify, _Progress, _run
    out, data_root = Path(out), Path(data_root)
    user = list(overrides)
    user_keys = [o.split("=", 1)[0].strip() for o in user]
    for bad in ("out", "data.final", "train.seed"):
        if bad in user_keys:
            raise ReproduceError(f"{bad}= is set by gapt reproduce (use --out / --seeds)")
    if getattr(plan, "execute", None) is not None:  # a figure that trains nothing (fig2, fig9: DIP jobs)
        return _run_execute(plan, Path(out), Path(data_root), weights, backend, workers, preload, executor,
                            "device=cpu" not in list(overrides))
    wmap = parse_weights(list(weights), sorted({s.backbone for s in plan.specs}))
    check_inputs(plan, data_root, wmap, user_keys)
    C.parse_overrides(user)  # a typo'd key stops here, before any run
    if executor is None:
        if backend == "ray" and any(s.runner for s in plan.specs):
            raise ReproduceError(f"{plan.name} trains segmentation models, which --backend ray does not run yet; "
                                 f"use the local backend")
        executor = make_executor(backend, workers, preload, use_gpus="device=cpu" not in user, **(ray_options or {}))
    out.mkdir(parents=True, exist_ok=True)
    progress = _PlanProgress(out, plan)
    progress.state.update(data_root=str(data_root), overrides=user, seeds=seeds)

    direct, swept = [s for s in plan.specs if not s.lr_sweep], [s for s in plan.specs if s.lr_sweep]
    jobs = []
    for spec in direct:
        for job in spec_jobs(spec, out, spec_overrides(spec, data_root, wmap, user), seeds):
            check_same_run(job)
            jobs.append(job)
    for i, job in enumerate(jobs, 1):
        job.index, job.total = i, len(jobs)
    sp_state: Dict[str, Any] = {"trials": [], "finals": []}
    sp = _Progress(sp_state, out / ".jobs")
    sp.write = lambda: None  # reproduce.json is this plan's record

    def ended(job, status):
        rec = sp.records[(job.kind, job.name)]
        progress.set(job.name, status=status, error=rec.get("error"), test_top1=rec.get("test_top1"),
                     test_top1_last=rec.get("test_top1_last"))
    sp.end_hook = ended
    if jobs:
        log.info("%s: %d final run(s) with the paper's settings; %s", plan.name, len(jobs),
                 executor.describe() if hasattr(executor, "describe") else "")
    pending = _classify(jobs, sp, retry_failed)
    for job in jobs:
        rec = sp.records[(job.kind, job.name)]
        progress.set(job.name, status=rec["status"], error=rec.get("error"))
    _run(executor, pending, sp, False)

    from ..sweep.run import run_sweep
    for spec in swept:
        name = spec.name
        try:
            state = run_sweep(str(PRESETS / spec.preset),
                              spec_overrides(spec, data_root, wmap, user) + [f"out={out / name}"],
                              seeds=seeds, executor=executor, retry_failed=retry_failed, grid=spec.grid)
            progress.set(name, status=state["status"], choice=state.get("choice"),
                         final_test_top1=state.get("final_test_top1"),
                         final_test_top1_last=state.get("final_test_top1_last"))
        except (SweepError, C.ConfigError) as e:
            log.error("%s: %s", name, e)
            progress.set(name, status="failed", error=str(e))
    failed = {k: v.get("error") for k, v in progress.state["specs"].items() if v.get("status") not in ("done",)}
    progress.state["failed"] = failed
    progress.state["status"] = "done" if not failed else "failed"
    progress.write()
    return progress.state


def _run_execute(plan: Plan, out: Path, data_root: Path, weights: Sequence[str], backend: str,
                 workers: Optional[int], preload: Sequence[str], executor, use_gpus: bool) -> Dict[str, Any]:
    """Run a plan's own ``execute(plan, out, data_root, {backbone: file}, executor)``; reproduce.json's shape."""
    from ..sweep.executors import make_executor
    wmap: Dict[str, str] = {}
    for w in weights:
        if "=" not in w:
            raise ReproduceError(f"{plan.name} uses several backbones: give --weights BACKBONE=FILE for each")
        bb, path = w.split("=", 1)
        if not Path(path).is_file():
            raise ReproduceError(f"weights file for {bb} not found: {path}")
        wmap[bb] = path
    if not data_root.is_dir():
        raise ReproduceError(f"--data-root {data_root} is not a folder")
    executor = executor or make_executor(backend, workers, preload, use_gpus=use_gpus)
    try:
        summary = plan.execute(plan, out, data_root, wmap, executor)
    except (FileNotFoundError, ValueError) as e:
        raise ReproduceError(str(e)) from None
    failed = {m["job"]: m.get("error") for m in summary.get("failed", [])}
    state = {"plan": plan.name, "status": "failed" if failed else "done", "failed": failed}
    from ..sweep.jobs import _write_json
    _write_json(out / REPRODUCE_FILE, state)
    return state


# -- results and the table ----------------------------------------------------------------------
def spec_results(plan: Plan, out, seeds: int = 1) -> Dict[str, List[Dict[str, Any]]]:
    """spec name -> the results.json of its finished final runs (seeds ``42..42+seeds-1`` of the preset)."""
    out = Path(out)
    found: Dict[str, List[Dict[str, Any]]] = {}
    for spec in plan.specs:
        runs = []
        final = out / spec.name / "final"
        for f in sorted(final.glob("seed*/results.json")) if final.is_dir() else []:
            try:
                runs.append(json.loads(f.read_text()))
            except (OSError, ValueError):
                continue
        found[spec.name] = runs[:seeds] if seeds else runs
    return found
