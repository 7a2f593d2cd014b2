"""Hyper-parameter sweeps (SPEC §6): a grid of trials picked on val, then final runs with several seeds.

``gapt sweep --config FILE [KEY=VALUE ...]`` runs, under the config's ``out``::

    sweep.json          every trial (overrides, folder, status, val/test top-1 or error), the
                        choice, the finals and the mean/std of the finals' test top-1
    trials/<name>/      one ordinary run folder per grid point (data.final=false), plus
                        trial.yaml (the config it runs), train.log (worker output) and, after a
                        failure, error.json; after an ASHA stop, stopped.json
    final/seed<S>/      one ordinary run folder per seed of the chosen point (data.final=true); on
                        FGVC the seed of the chosen trial is that trial itself (same split, seed and
                        settings): copied from it, not trained again (:mod:`.reuse`; results.json
                        and sweep.json's final record say ``reused_from``)

A ``KEY=a,b,c`` override is swept, a ``KEY=a`` override is fixed; the grid is the cartesian
product of the swept keys, after the preset grid (``spec``: SPEC §6's learning rates, ``vpt``:
VPT's lr x weight decay, ``none``). A key the user gives replaces the preset's entry for it.
The best trial is the one with the highest ``metrics.val_top1_best`` (ties: the first in grid
order).

The run folders are the source of truth, so a killed sweep restarted with the same command
skips finished runs (results.json), continues interrupted ones from their resume file (last.pt)
and keeps failures (error.json) unless ``retry_failed``. Nothing here imports Ray at import
time; executors run the jobs: ``inline`` (this process), ``process`` (one subprocess per
run, one GPU each, or CPU threads split between workers) and ``ray`` (:mod:`.ray_tune`).

This module runs the sweep itself (plan, trials, choice, finals, sweep.json; whole benchmarks: :mod:`.benchmark`); the
grid comes from :mod:`.grid`, jobs and their folders from :mod:`.jobs`, executors
and the worker process from :mod:`.executors`.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import math
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .. import config as C
from .executors import make_executor
from .grid import (
    _yaml_value,
    build_grid,
    grid_points,
    parse_sweep_overrides,
    point_names,
)
from .jobs import (
    Job,
    SweepError,
    _write_json,
    check_same_run,
    folder_state,
    prepare_folder,
    read_error,
    run_numbers,
)
from .reuse import reuse_chosen_trial

log = logging.getLogger("gapt.sweep")

SWEEP_FILE = "sweep.json"


# -- the sweep ----------------------------------------------------------------------------------
@dataclass
class SweepPlan:
    config: Optional[str]
    fixed: List[str]
    grid: Dict[str, List[str]]
    out: Path
    trials: List[Job] = field(default_factory=list)


def plan_sweep(config: Optional[str], overrides: Sequence[str] = (), grid: str = "spec") -> SweepPlan:
    """Parse, build and validate every trial's config before any work starts."""
    fixed, swept = parse_sweep_overrides(list(overrides))
    base = C.load_config(config, fixed)  # a bad file or fixed override stops the sweep here
    keys = build_grid(grid, fixed, swept)
    points = grid_points(keys)
    names = point_names(points)
    out = Path(base.out)
    trials = []
    for i, (point, name) in enumerate(zip(points, names), 1):
        job = Job("trial", name, out / "trials" / name, point, index=i, total=len(points))
        try:
            cfg = C.load_config(config, fixed + [f"{k}={v}" for k, v in point.items()])
            job.cfg = dataclasses.replace(cfg, out=str(job.folder), data=dataclasses.replace(cfg.data, final=False))
        except C.ConfigError as e:
            job.config_error = f"ConfigError: {e}"
        trials.append(job)
    return SweepPlan(config, fixed, keys, out, trials)


def _final_jobs(plan: SweepPlan, chosen: Job, seeds: int) -> List[Job]:
    jobs = []
    base_seed = chosen.cfg.train.seed
    for i in range(seeds):
        seed = base_seed + i
        folder = plan.out / "final" / f"seed{seed}"
        cfg = dataclasses.replace(chosen.cfg, out=str(folder), data=dataclasses.replace(chosen.cfg.data, final=True),
                                  train=dataclasses.replace(chosen.cfg.train, seed=seed))
        jobs.append(Job("final", f"seed{seed}", folder, dict(chosen.overrides), cfg=cfg, seed=seed, index=i + 1,
                        total=seeds))
    return jobs


def _record(job: Job, status: str, error: Optional[str], out: Path) -> Dict[str, Any]:
    rec: Dict[str, Any] = {"name": job.name}
    if job.kind == "trial":
        rec["overrides"] = {k: _yaml_value(v) for k, v in job.overrides.items()}
    else:
        rec["seed"] = job.seed
    rec["folder"] = os.path.relpath(job.folder, out)
    rec["status"] = status
    if job.folder.exists():
        rec.update({k: v for k, v in run_numbers(job.folder, finished=status == "done").items() if v is not None})
    if error:
        rec["error"] = error
    return rec


def _fmt_num(x: Any) -> str:
    return f"{x:.2f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class _Progress:
    """Keeps sweep.json and the log in step with the runs (callbacks may come from worker threads)."""

    def __init__(self, state: Dict[str, Any], out: Path):
        self.state, self.out = state, out
        self.lock = threading.Lock()
        self.records: Dict[Tuple[str, str], Dict[str, Any]] = {}
        self.end_hook: Optional[Callable[[Job, str], None]] = None

    def set(self, job: Job, status: str, error: Optional[str] = None) -> Dict[str, Any]:
        rec = _record(job, status, error, self.out)
        with self.lock:
            self.records[(job.kind, job.name)] = rec
        return rec

    def start(self, job: Job) -> None:
        job.started = time.time()
        how = ""
        if job.resume:
            how = f" (resuming after epoch {run_numbers(job.folder).get('epochs_run', 0)})"
        log.info("%s: start%s", job.label, how)
        with self.lock:
            self.records[(job.kind, job.name)]["status"] = "running"
        self.write()

    def end(self, job: Job, status: str, error: Optional[str]) -> None:
        rec = self.set(job, status, error)
        took = _duration(time.time() - job.started) if job.started else "?"
        if status == "done":
            log.info("%s: done in %s, val top-1 %s (test %s)", job.label, took, _fmt_num(rec.get("val_top1")),
                     _fmt_num(rec.get("test_top1")))
        elif status == "stopped":
            log.info("%s: stopped early by ASHA after %s epoch(s), val top-1 %s", job.label,
                     rec.get("epochs_run", "?"), _fmt_num(rec.get("val_top1")))
        elif status == "interrupted":
            log.warning("%s: interrupted after %s epoch(s); rerun the sweep to continue it", job.label,
                        rec.get("epochs_run", "?"))
        else:
            log.warning("%s: FAILED after %s: %s", job.label, took, error)
        self.write()
        if self.end_hook is not None:
            self.end_hook(job, status)

    def write(self) -> None:
        with self.lock:
            self.state["updated"] = _dt.datetime.now().isoformat(timespec="seconds")
            _write_json(self.out / SWEEP_FILE, self.state)


def _summary(finals: List[Dict[str, Any]], key: str = "test_top1") -> Dict[str, Any]:
    values = [f[key] for f in finals if f.get("status") == "done" and f.get(key) is not None]
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None,  # sample std (ddof=1), as gapt report
            "n": len(values), "values": values}


def run_sweep(config: Optional[str], overrides: Sequence[str] = (), *, grid: str = "spec", seeds: int = 3,
              executor=None, backend: str = "local", workers: Optional[int] = None, preload: Sequence[str] = (),
              early_stop: Optional[str] = None, retry_failed: bool = False, dry_run: bool = False,
              on_run_end: Optional[Callable[[Job, str], None]] = None, ray_options: Optional[dict] = None,
              ) -> Dict[str, Any]:
    """Run the grid, pick the best trial on val, run ``seeds`` finals; return sweep.json's content.

    ``executor`` (an object with ``run(jobs, on_start, on_end, early_stop)``) overrides
    ``backend``/``workers``. ``on_run_end(job, status)`` is called after each run (tests stop a
    sweep there to simulate a kill). Raises SweepError when no trial finished.
    """
    if early_stop not in (None, "", "none", "asha"):
        raise SweepError(f"unknown --early-stop {early_stop!r}; choose asha or none")
    early = early_stop == "asha"
    plan = plan_sweep(config, overrides, grid)
    out = plan.out
    for job in plan.trials:
        check_same_run(job)
    if dry_run:
        return _dry_run(plan, seeds)
    if not preload:  # a --preload module may register backbones this process does not know
        from ..engine.trainer import check_model_config
        for job in plan.trials:  # a misspelled backbone or missing weights file: before any trial
            if job.cfg is not None:
                check_model_config(job.cfg)
    if executor is None:
        base_device = next((j.cfg.device for j in plan.trials if j.cfg is not None), "auto")
        executor = make_executor(backend, workers, preload, use_gpus=base_device != "cpu",
                                 **(dict(ray_options or {}, early_stop=early)))
    if early and not getattr(executor, "supports_early_stop", False):
        raise SweepError("--early-stop asha needs --backend ray")
    out.mkdir(parents=True, exist_ok=True)
    state: Dict[str, Any] = {
        "status": "running", "config": config, "overrides": list(overrides), "fixed": plan.fixed,
        "grid": {k: [_yaml_value(v) for v in vs] for k, vs in plan.grid.items()}, "grid_preset": grid,
        "metric": "metrics.val_top1_best", "seeds": seeds, "backend": getattr(executor, "name", type(executor).__name__),
        "early_stop": "asha" if early else None, "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "trials": [], "choice": None, "finals": [], "final_test_top1": None, "final_test_top1_last": None,
    }
    progress = _Progress(state, out)
    progress.end_hook = on_run_end
    if hasattr(executor, "describe"):
        log.info("sweep %s: %d trial(s) over %s; %s", out, len(plan.trials),
                 ", ".join(f"{k} ({len(v)})" for k, v in plan.grid.items()) or "no swept key", executor.describe())

    finals: List[Job] = []
    try:
        pending = _classify(plan.trials, progress, retry_failed)
        state["trials"] = [progress.records[("trial", j.name)] for j in plan.trials]
        progress.write()
        _run(executor, pending, progress, early)
        state["trials"] = [progress.records[("trial", j.name)] for j in plan.trials]
        _check_complete(plan.trials, progress, state, out)

        done = [j for j in plan.trials if progress.records[("trial", j.name)]["status"] == "done"]
        if not done:
            state["status"] = "failed"
            progress.write()
            errors = "; ".join(f"{j.name}: {progress.records[('trial', j.name)].get('error', '?')}"
                               for j in plan.trials[:5])
            raise SweepError(f"all {len(plan.trials)} trial(s) of the sweep in {out} failed ({errors}"
                             f"{' ...' if len(plan.trials) > 5 else ''}); see {out / SWEEP_FILE}")
        chosen = max(done, key=lambda j: (_val(progress.records[("trial", j.name)]), -j.index))
        crec = progress.records[("trial", chosen.name)]
        state["choice"] = {"name": chosen.name, "folder": crec["folder"], "overrides": crec.get("overrides", {}),
                           "val_top1": crec.get("val_top1")}
        log.info("chosen: %s (val top-1 %s)", chosen.name, _fmt_num(crec.get("val_top1")))

        finals = _final_jobs(plan, chosen, seeds)
        for job in finals:
            check_same_run(job)
            reuse_chosen_trial(job, chosen, out)  # FGVC: the final at the trial's seed is the trial
        pending = _classify(finals, progress, retry_failed)
        state["finals"] = [progress.records[("final", j.name)] for j in finals]
        progress.write()
        _run(executor, pending, progress, False)
        state["finals"] = [progress.records[("final", j.name)] for j in finals]
        _check_complete(finals, progress, state, out)
        state["final_test_top1"] = _summary(state["finals"])  # each run's own number (best-val with held-out val)
        state["final_test_top1_last"] = _summary(state["finals"], "test_top1_last")  # the paper's protocol
        failed_finals = [f for f in state["finals"] if f["status"] != "done"]
        state["status"] = "done" if not failed_finals else "finals_failed"
        progress.write()
    except BaseException:
        if state["status"] == "running":
            state["status"] = "interrupted"
            for job in plan.trials + finals:
                if progress.records.get((job.kind, job.name), {}).get("status") == "running":
                    progress.set(job, "interrupted")
            state["trials"] = [progress.records.get(("trial", j.name), {"name": j.name}) for j in plan.trials]
            if finals:
                state["finals"] = [progress.records.get(("final", j.name), {"name": j.name}) for j in finals]
            progress.write()
        raise
    print_table(state)
    if seeds and state["final_test_top1"]["n"] == 0:
        raise SweepError(f"every final run of the sweep in {out} failed; see {out / SWEEP_FILE}")
    return state


def _check_complete(jobs: List[Job], progress: _Progress, state: Dict[str, Any], out: Path) -> None:
    unfinished = [j.name for j in jobs if progress.records[(j.kind, j.name)]["status"] in
                  ("pending", "running", "interrupted")]
    if unfinished:
        state["status"] = "interrupted"
        progress.write()
        raise SweepError(f"{len(unfinished)} run(s) did not finish ({', '.join(unfinished[:5])}); "
                         f"rerun the same command to continue the sweep in {out}")


def _val(rec: Dict[str, Any]) -> float:
    v = rec.get("val_top1")
    return v if isinstance(v, (int, float)) and math.isfinite(v) else -math.inf


def _classify(jobs: List[Job], progress: _Progress, retry_failed: bool) -> List[Job]:
    """Record the state of each job's folder; return those that must run."""
    pending = []
    for job in jobs:
        if job.config_error:
            progress.set(job, "failed", job.config_error)
            log.warning("%s: invalid config, skipped: %s", job.label, job.config_error)
            continue
        state = folder_state(job.folder)
        if state == "done":
            progress.set(job, "done")
            continue
        if state == "failed" and not retry_failed:
            progress.set(job, "failed", read_error(job.folder))
            continue
        if state == "stopped" and not retry_failed:
            progress.set(job, "stopped")
            continue
        progress.set(job, "pending")
        pending.append(job)
    return pending


def _run(executor, jobs: List[Job], progress: _Progress, early: bool) -> None:
    if not jobs:
        return
    for job in jobs:
        prepare_folder(job)
    executor.run(jobs, progress.start, progress.end, early_stop=early)


def _dry_run(plan: SweepPlan, seeds: int) -> Dict[str, Any]:
    trials = []
    for job in plan.trials:
        status = "invalid" if job.config_error else folder_state(job.folder)
        trials.append({"name": job.name, "overrides": {k: _yaml_value(v) for k, v in job.overrides.items()},
                       "folder": str(job.folder), "status": status, **({"error": job.config_error}
                                                                        if job.config_error else {})})
    return {"status": "dry_run", "out": str(plan.out), "fixed": plan.fixed,
            "grid": {k: [_yaml_value(v) for v in vs] for k, vs in plan.grid.items()}, "seeds": seeds,
            "trials": trials}


def print_table(state: Dict[str, Any], file=None) -> None:
    """The trials (chosen one starred), then the finals and their mean +- std."""
    file = file or sys.stdout
    chosen = (state.get("choice") or {}).get("name")
    rows = [("", "trial", "status", "val top-1", "test top-1", "epochs", "note")]
    for t in state.get("trials", []):
        rows.append(("*" if t["name"] == chosen else "", t["name"], t.get("status", "?"), _fmt_num(t.get("val_top1")),
                     _fmt_num(t.get("test_top1")), str(t.get("epochs_run", "-")), (t.get("error") or "")[:80]))
    for f in state.get("finals", []):
        note = f"reused from {f['reused_from']}" if f.get("reused_from") else (f.get("error") or "")[:80]
        rows.append(("", f"final/{f['name']}", f.get("status", "?"), _fmt_num(f.get("val_top1")),
                     _fmt_num(f.get("test_top1")), str(f.get("epochs_run", "-")), note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) if i in (1, 2, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              .rstrip(), file=file)
    s = state.get("final_test_top1") or {}
    if s.get("n"):
        std = f" +- {s['std']:.2f}" if s.get("std") is not None else ""
        last = state.get("final_test_top1_last") or {}
        at_last = ""
        if last.get("n"):
            at_last = f"; last epoch {last['mean']:.2f}" + (f" +- {last['std']:.2f}" if last.get("std") is not None else "")
        print(f"final test top-1 ({chosen}, {s['n']} seed(s)): {s['mean']:.2f}{std}{at_last}", file=file)
