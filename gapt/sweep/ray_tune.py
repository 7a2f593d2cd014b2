"""Ray Tune backend of ``gapt sweep`` (``--backend ray``; ``pip install gapt[ray]``).

Each run of the sweep is one Tune trial of a function trainable that calls gapt's own
``train`` on the run's trial.yaml, in a thread, while the trainable tails the run's
metrics.jsonl and reports every epoch's val top-1 to Tune (ASHA needs live reports). The run
folder stays the record: Tune's own files go to ``out/.ray`` and are not read back, so a
restarted sweep decides what to run from the run folders, exactly as with the local backend.

Trials take 1 GPU each when the cluster has GPUs, else ``cpus_per_trial`` CPUs (default:
the cluster's CPUs / ``workers``, or 1). With ``address="auto"`` they spread over every node
of a running cluster; the sweep's ``out``, the data and the weights must then be on a shared
file system at the same absolute path on every node, and gapt installed on every node.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

try:
    import ray
    from ray import tune
except ImportError as e:  # the message gapt sweep shows
    raise ImportError(f"Ray Tune is not installed (pip install gapt[ray]): {e}") from e

from .. import config as C
from ..engine.runfolder import METRICS, RESULTS
from .jobs import (
    ERROR_FILE,
    STOPPED_FILE,
    TRIAL_CONFIG,
    WORKER_LOG,
    Job,
    OnEnd,
    OnStart,
    _write_json,
    call_target,
    format_error,
    load_preload,
    localize_device,
    read_error,
    run_numbers,
    write_error,
)

log = logging.getLogger("gapt.sweep")


# -- the trainable (runs inside a Ray actor) ----------------------------------------------------
def _report_line(rec: Dict[str, Any]) -> Dict[str, Any]:
    out = {"epoch": int(rec["epoch"])}  # 1-based in metrics.jsonl, as ASHA's time attribute wants
    for k, v in rec.items():
        if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
    return out


def gapt_trainable(config: Dict[str, Any], specs: Dict[str, Dict[str, Any]]) -> None:
    """Run one job of the sweep; report each epoch's metrics line to Tune as it appears."""
    spec = specs[config["job"]]
    folder = Path(spec["folder"])
    if os.path.isdir(spec["cwd"]):
        os.chdir(spec["cwd"])  # relative data.root / weights mean what they meant to the driver
    handler = logging.FileHandler(folder / WORKER_LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    gapt_log = logging.getLogger("gapt")
    gapt_log.addHandler(handler)
    gapt_log.setLevel(logging.INFO)
    try:
        load_preload(spec["preload"])
        import torch
        resources = ray.get_runtime_context().get_assigned_resources()
        gpu = resources.get("GPU", 0) > 0
        if not gpu:
            torch.set_num_threads(max(1, int(resources.get("CPU", 1))))
        if spec.get("target"):  # not a training run: no per-epoch metrics to report
            try:
                call_target(spec["target"], folder, spec["resume"])
            finally:
                handler.close()
                gapt_log.removeHandler(handler)
            return
        cfg = C.load_config(str(folder / TRIAL_CONFIG), saved=True)
        cfg = localize_device(dataclasses.replace(cfg, out=str(folder)), gpu)
    except Exception as e:
        write_error(folder, format_error(e), traceback.format_exc())
        raise

    outcome: Dict[str, Any] = {}

    def run() -> None:
        from ..engine.trainer import train
        try:
            train(cfg, resume=spec["resume"])
        except BaseException as e:  # noqa: BLE001 - handed to the trainable's thread
            outcome["error"] = e
            outcome["traceback"] = traceback.format_exc()

    worker = threading.Thread(target=run, name="gapt-train", daemon=True)
    worker.start()
    reported = 0
    last_epoch = cfg.train.epochs  # metrics.jsonl numbers epochs from 1
    held: Optional[Dict[str, Any]] = None
    while True:
        alive = worker.is_alive()
        for rec in _read_metrics(folder):
            if rec.get("epoch", 0) <= reported or "val_top1" not in rec:
                continue
            reported = rec["epoch"]
            if rec["epoch"] >= last_epoch:
                held = rec  # a stop here would lose the test evaluation and results.json
            else:
                tune.report(_report_line(rec))
        if not alive:
            break
        time.sleep(0.5)
    handler.close()
    gapt_log.removeHandler(handler)
    if "error" in outcome:
        e = outcome["error"]
        write_error(folder, format_error(e), outcome["traceback"])
        raise e
    if held is not None:
        tune.report(_report_line(held))


def _read_metrics(folder: Path) -> List[Dict[str, Any]]:
    try:
        text = (folder / METRICS).read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            break
    return out


# -- the driver ---------------------------------------------------------------------------------
# Tune pickles its run config (callbacks included), so the callback holds only a key into this table.
_RELAYS: Dict[str, Any] = {}


class _Relay(tune.Callback):
    """Trial start / end in the driver -> the sweep's log lines and sweep.json."""

    def __init__(self, key: str):
        self.key = key

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.key in _RELAYS:
            _RELAYS[self.key][0](trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.key in _RELAYS:
            _RELAYS[self.key][1](trial, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.key in _RELAYS:
            _RELAYS[self.key][1](trial, f"Ray trial failed; Tune's log: {getattr(trial, 'local_path', '') or '?'}")


# ---------------------------------------------------------------------------------
class RayExecutor:
    """Runs the sweep's jobs as Ray Tune trials (optionally with ASHA on val top-1)."""
    name = "ray"
    supports_early_stop = True

    def __init__(self, workers: Optional[int] = None, preload: Sequence[str] = (), address: Optional[str] = None,
                 cpus_per_trial: Optional[float] = None, early_stop: bool = False, asha_grace: Optional[int] = None,
                 asha_reduction: float = 3.0):
        self.workers = workers if workers and workers > 0 else None
        self.preload = [str(Path(p).resolve()) if p.endswith(".py") else p for p in preload]
        self.address = address
        self.cpus_per_trial = cpus_per_trial
        self.asha_grace = asha_grace
        self.asha_reduction = asha_reduction

    def describe(self) -> str:
        where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
        return f"Ray Tune on {where}"

    def _resources(self) -> Dict[str, float]:
        total = ray.cluster_resources()
        gpus, cpus = total.get("GPU", 0), total.get("CPU", 1)
        if gpus >= 1:
            return {"cpu": self.cpus_per_trial or max(1, int(cpus // gpus)), "gpu": 1}
        if self.cpus_per_trial:
            return {"cpu": self.cpus_per_trial}
        return {"cpu": max(1, int(cpus // self.workers)) if self.workers else 1}

    def _scheduler(self, jobs: List[Job]):
        from ray.tune.schedulers import ASHAScheduler
        epochs = min(j.cfg.train.epochs for j in jobs)
        if epochs < 2:
            log.warning("ASHA needs 2 or more epochs; running every trial to the end")
            return None
        max_t = epochs - 1  # rungs below the last epoch: the last one is only reported once results.json exists
        warmup = min(C.warmup_epochs(j.cfg.train) for j in jobs)
        grace = self.asha_grace or max(1, warmup)
        grace = min(max(1, grace), max_t)
        log.info("ASHA on val top-1: first rung after %d epoch(s), reduction factor %g", grace, self.asha_reduction)
        return ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=grace,
                             reduction_factor=self.asha_reduction, stop_last_trials=False)

    def run(self, jobs: List[Job], on_start: OnStart, on_end: OnEnd, early_stop: bool = False) -> None:
        started_here = False
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address)
            else:
                ray.init(include_dashboard=False)
            started_here = True
        try:
            self._run(jobs, on_start, on_end, early_stop)
        finally:
            if started_here:
                ray.shutdown()

    def _run(self, jobs: List[Job], on_start: OnStart, on_end: OnEnd, early_stop: bool) -> None:
        by_name = {j.name: j for j in jobs}
        specs = {j.name: {"folder": str(j.folder.resolve()), "resume": j.resume, "cwd": os.getcwd(),
                          "preload": self.preload, "target": j.target} for j in jobs}
        ended: set = set()

        def start(trial) -> None:
            job = by_name.get(trial.config.get("job"))
            if job is not None:
                on_start(job)

        def end(trial, error: Optional[str]) -> None:
            job = by_name.get(trial.config.get("job"))
            if job is None or job.name in ended:
                return
            ended.add(job.name)
            if (job.folder / RESULTS).exists():
                on_end(job, "done", None)
            elif error is not None:
                message = read_error(job.folder) or error
                if not (job.folder / ERROR_FILE).exists():
                    write_error(job.folder, message)
                on_end(job, "failed", message)
            elif early_stop:
                numbers = run_numbers(job.folder, finished=False)
                _write_json(job.folder / STOPPED_FILE, {"by": "ASHA", **numbers})
                on_end(job, "stopped", None)
            else:
                message = "the trial ended without writing results.json"
                write_error(job.folder, message)
                on_end(job, "failed", message)

        key = f"{id(self)}-{time.time()}"
        _RELAYS[key] = (start, end)
        resources = self._resources()
        scheduler = self._scheduler(jobs) if early_stop else None
        trainable = tune.with_resources(tune.with_parameters(gapt_trainable, specs=specs), resources)
        storage = jobs[0].folder.resolve().parents[1] / ".ray"
        kind = jobs[0].kind
        tuner = tune.Tuner(
            trainable,
            param_space={"job": tune.grid_search([j.name for j in jobs])},
            tune_config=tune.TuneConfig(metric="val_top1", mode="max", scheduler=scheduler,
                                        max_concurrent_trials=self.workers, reuse_actors=False,
                                        trial_name_creator=lambda t: f"{kind}-{t.config['job']}",
                                        trial_dirname_creator=lambda t: f"{kind}-{t.config['job']}"),
            run_config=tune.RunConfig(name=f"{kind}s-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(storage),
                                      verbose=0, callbacks=[_Relay(key)],
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        log.info("Ray Tune: %d %s(s), %s per trial", len(jobs), kind,
                 ", ".join(f"{v:g} {k.upper()}" for k, v in resources.items()))
        # The legacy reporter honours verbose=0; without Tune's SIGINT handler Ctrl-C raises here
        # instead of ending every trial as if it had completed (which would read as a failure).
        env = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_SIGINT_HANDLER": "1"}
        saved = {k: os.environ.get(k) for k in env}
        tune_logger = logging.getLogger("ray.tune")
        level = tune_logger.level
        try:
            for k, v in env.items():
                os.environ.setdefault(k, v)
            tune_logger.setLevel(logging.WARNING)
            results = tuner.fit()
        finally:
            _RELAYS.pop(key, None)
            tune_logger.setLevel(level)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
        for result in results:  # anything the callbacks did not see
            name = (result.config or {}).get("job")
            if name in by_name and name not in ended:
                fake = type("T", (), {"config": {"job": name}})()
                end(fake, format_error(result.error) if result.error else None)
        for job in jobs:  # not ended: interrupted, not failed (no error.json: a restart runs it)
            if job.name not in ended:
                ended.add(job.name)
                on_end(job, "done" if (job.folder / RESULTS).exists() else "interrupted", None)
