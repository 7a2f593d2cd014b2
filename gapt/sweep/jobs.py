"""One run of a sweep (a trial or a final) and its folder.

:class:`Job`, the files the sweep keeps beside the run's own (trial.yaml, error.json,
stopped.json, train.log), a folder's state (done / failed / stopped / partial / new), its
val/test numbers so far, the check that a restarted sweep finds the same run in a folder, and
the preparation of a folder before its run starts; also :class:`SweepError`.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from .. import config as C
from ..engine import runfolder as rf
from ..engine.runfolder import CONFIG as RUN_CONFIG
from ..engine.runfolder import METRICS, RESULTS, RESUME

TRIAL_CONFIG = "trial.yaml"
ERROR_FILE = "error.json"
STOPPED_FILE = "stopped.json"
WORKER_LOG = "train.log"

class SweepError(RuntimeError):
    """A sweep that cannot start or that produced no usable trial; the message says why."""


# -- jobs and their folders ---------------------------------------------------------------------
@dataclass
class Job:
    """One run of the sweep: a trial (grid point) or a final (one seed)."""
    kind: str                         # "trial" | "final"
    name: str                         # folder name under trials/ or final/
    folder: Path
    overrides: Dict[str, str]         # the swept values (trials) or the chosen ones (finals)
    cfg: Optional[C.RunConfig] = None
    config_error: Optional[str] = None
    seed: Optional[int] = None
    index: int = 0                    # position in grid order (1-based)
    total: int = 0
    resume: bool = False
    started: float = 0.0
    runner: str = ""                  # "module:function" that trains cfg; "" = the classification trainer
    # Not a training run: "module:function" called as function(folder, resume=...) (e.g. a DIP
    # reconstruction); done when it has written results.json into its folder.
    target: Optional[str] = None

    @property
    def label(self) -> str:
        return f"[{self.index}/{self.total}] {self.kind} {self.name}"


def resolve_runner(name: str = ""):
    """The function a job calls as ``fn(cfg, resume=...)``: ``module:function``, default the trainer."""
    module, _, fn = (name or "gapt.engine.trainer:train").partition(":")
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise SweepError(f"unknown run function {name!r} ({e})") from None


def folder_state(folder: Path) -> str:
    """stopped | done | failed | partial (resume file) | new.

    ``stopped`` (ASHA's decision, recorded by the sweep) comes first: a stopped trial's actor may
    live long enough to finish a short run, and a restart must not revise the choice made."""
    folder = Path(folder)
    if (folder / STOPPED_FILE).exists():
        return "stopped"
    if (folder / RESULTS).exists():
        return "done"
    if (folder / ERROR_FILE).exists():
        return "failed"
    if (folder / RESUME).exists():
        return "partial"
    return "new"


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rf.write_json(path, obj)


def write_error(folder: Path, message: str, tb: Optional[str] = None) -> None:
    _write_json(Path(folder) / ERROR_FILE, {"error": message, "traceback": tb,
                                            "time": _dt.datetime.now().isoformat(timespec="seconds")})


def read_error(folder: Path) -> Optional[str]:
    data = _read_json(Path(folder) / ERROR_FILE)
    return None if data is None else str(data.get("error"))


def format_error(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def run_numbers(folder: Path, finished: bool = True) -> Dict[str, Any]:
    """val/test numbers of a run folder: from results.json when finished, else metrics.jsonl so far."""
    folder = Path(folder)
    res = _read_json(folder / RESULTS) if finished else None
    if res is not None:
        m = res.get("metrics", {})
        return {"val_top1": m.get("val_top1_best"), "test_top1": m.get("test_top1"),
                "test_top1_last": m.get("test_top1_last"), "best_epoch": m.get("best_epoch"),
                "epochs_run": res.get("epochs"), "final": res.get("final"), "train_time_s": res.get("train_time_s"),
                "reused_from": res.get("reused_from")}
    vals, epochs = [], 0
    path = folder / METRICS
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "val_top1" in rec:
                vals.append(rec["val_top1"])
            epochs = max(epochs, int(rec.get("epoch", 0)))  # epochs count from 1 in metrics.jsonl
    return {"val_top1": max(vals) if vals else None, "test_top1": None, "epochs_run": epochs}


# What an executor tells the sweep: a job starts; a job ends with a status (done|failed|stopped) and an error.
OnStart = Callable[[Job], None]
OnEnd = Callable[[Job, str, Optional[str]], None]


def check_same_run(job: Job) -> None:
    """A folder left by an earlier sweep must hold the same run, or restarting would mix settings."""
    folder = job.folder
    saved = folder / TRIAL_CONFIG if (folder / TRIAL_CONFIG).exists() else folder / RUN_CONFIG
    if not saved.exists() or job.cfg is None:
        return
    try:
        old = C.load_config(str(saved), saved=True)
    except C.ConfigError as e:
        raise SweepError(f"{folder} holds a run whose config cannot be read ({e}); "
                         f"delete that folder or choose another out=") from None
    diffs = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in C.run_differences(old, job.cfg).items()]
    if diffs:
        raise SweepError(f"{folder} holds a {job.kind} run with other settings ({'; '.join(diffs[:4])}"
                         f"{' ...' if len(diffs) > 4 else ''}); restart the sweep with the same settings, "
                         f"delete that folder, or choose another out=")


def prepare_folder(job: Job) -> None:
    """Write trial.yaml and decide fresh start vs resume; clear what a fresh start must not see."""
    job.folder.mkdir(parents=True, exist_ok=True)
    text = C.to_yaml(job.cfg)
    path = job.folder / TRIAL_CONFIG
    if not path.exists() or path.read_text() != text:
        rf.atomic_write_text(path, text)
    for stale in (ERROR_FILE, STOPPED_FILE):
        (job.folder / stale).unlink(missing_ok=True)
    job.resume = (job.folder / RESUME).exists()
    if not job.resume:
        # A run killed between its first metrics line and its first resume file starts afresh;
        # the trainer appends to metrics.jsonl, so an old line would be counted twice.
        (job.folder / METRICS).unlink(missing_ok=True)


def localize_device(cfg: C.RunConfig, gpu_assigned: bool) -> C.RunConfig:
    """A worker that sees one GPU (CUDA_VISIBLE_DEVICES) calls it cuda:0."""
    if gpu_assigned and cfg.device.startswith("cuda:"):
        return dataclasses.replace(cfg, device="cuda")
    return cfg


def call_target(target: str, folder: Path, resume: bool) -> None:
    """Run a non-training job: ``module:function`` called as ``function(folder, resume=resume)``."""
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name, None)
    if fn is None:
        raise SweepError(f"job target {target!r}: no function {name!r} in module {module}")
    fn(Path(folder), resume=resume)


def load_preload(items: Sequence[str]) -> None:
    """Import modules (names or .py files) that register things runs need, e.g. custom backbones."""
    for item in items or ():
        if item.endswith(".py") or os.sep in item:
            path = Path(item).resolve()
            name = "gapt_preload_" + re.sub(r"\W", "_", str(path))[-60:]
            if name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise SweepError(f"cannot import preload file {item}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(item)

