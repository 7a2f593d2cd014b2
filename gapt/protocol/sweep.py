"""Hyper-parameter sweeps (SPEC §6): a grid of trials picked on val, then final runs with several seeds.

``gapt sweep --config FILE [KEY=VALUE ...]`` runs, under the config's ``out``::

    sweep.json          every trial (overrides, folder, status, val/test top-1 or error), the
                        choice, the finals and the mean/std of the finals' test top-1
    trials/<name>/      one ordinary run folder per grid point (data.final=false), plus
                        trial.yaml (the config it runs), train.log (worker output) and, after a
                        failure, error.json; after an ASHA stop, stopped.json
    final/seed<S>/      one ordinary run folder per seed of the chosen point (data.final=true)

A ``KEY=a,b,c`` override is swept, a ``KEY=a`` override is fixed; the grid is the cartesian
product of the swept keys, after the preset grid (``spec``: SPEC §6's learning rates, ``vpt``:
VPT's lr x weight decay, ``none``). A key the user gives replaces the preset's entry for it.
The best trial is the one with the highest ``metrics.val_top1_best`` (ties: the first in grid
order).

The run folders are the source of truth, so a killed sweep restarted with the same command
skips finished runs (results.json), continues interrupted ones from their resume file (last.pt)
and keeps failures (error.json) unless ``retry_failed``. Nothing here imports Ray at import
time; executors run the jobs: ``inline`` (this process), ``process`` (one subprocess per
run, one GPU each, or CPU threads split between workers) and ``ray`` (:mod:`.sweep_ray`).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib
import importlib.util
import itertools
import json
import logging
import math
import os
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from .. import config as C
from ..engine import runfolder as rf
from ..engine.runfolder import CONFIG as RUN_CONFIG, METRICS, RESULTS, RESUME  # noqa: F401 (sweep_ray)

log = logging.getLogger("gapt.sweep")

SWEEP_FILE = "sweep.json"
TRIAL_CONFIG = "trial.yaml"
ERROR_FILE = "error.json"
STOPPED_FILE = "stopped.json"
WORKER_LOG = "train.log"

# SPEC §6 grids (values as strings: they are parsed like command-line overrides).
SPEC_LR = ["0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0"]
VPT_LR = ["50", "25", "10", "5", "2.5", "1", "0.5", "0.25", "0.1", "0.05"]
VPT_WD = ["0.01", "0.001", "0.0001", "0"]
GRIDS: Dict[str, Dict[str, List[str]]] = {
    "spec": {"train.lr": SPEC_LR},
    "vpt": {"train.lr": VPT_LR, "train.weight_decay": VPT_WD},
    "none": {},
}

# Short names for folder names: lr0.5_wd0, np10, gi5; other keys are spelled out (method-gated).
ALIASES = {"train.lr": "lr", "train.weight_decay": "wd", "num_prompts": "np", "gate_init": "gi",
           "train.epochs": "ep", "train.batch_size": "bs", "insert_at_block": "at", "train.seed": "seed",
           "prompt_dropout": "pd"}

# Keys that may change between a killed sweep and its restart without changing what a run computes.
RESTART_FREE_KEYS = {"out", "device", "weights", "data.root", "data.num_workers", "data.cache", "data.cache_dir",
                     "train.eval_batch_size"}
# Keys the sweep sets itself.
RESERVED_KEYS = {"out": "out is the sweep's folder (trials under out/trials, finals under out/final)",
                 "data.final": "trials run with data.final=false, finals with data.final=true"}


class SweepError(RuntimeError):
    """A sweep that cannot start or that produced no usable trial; the message says why."""


# -- parsing the grid ---------------------------------------------------------------------------
def split_values(value: str) -> List[str]:
    """``"0.1,0.5,1.0"`` -> ``["0.1", "0.5", "1.0"]``; ``\\,`` keeps a literal comma."""
    parts, cur, i = [], "", 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value) and value[i + 1] == ",":
            cur += ","
            i += 2
            continue
        if ch == ",":
            parts.append(cur)
            cur = ""
        else:
            cur += ch
        i += 1
    parts.append(cur)
    return parts


def _quote_commas(value: str) -> str:
    return value.replace(",", "\\,")


def parse_sweep_overrides(items: Sequence[str]) -> Tuple[List[str], Dict[str, List[str]]]:
    """Split ``KEY=VALUE`` items into fixed overrides and swept keys (``KEY=a,b,c``).

    Keys are checked against the config schema (a typo is an error naming the key); the value
    strings are kept as given and parsed later like ordinary overrides. A later item for the
    same key replaces an earlier one; repeated values in a list are dropped.
    """
    fixed: Dict[str, str] = {}
    swept: Dict[str, List[str]] = {}
    for item in items:
        if "=" not in item:
            raise C.ConfigError(f"override '{item}' is not KEY=VALUE (a swept key is KEY=a,b,c)")
        key, value = item.split("=", 1)
        key = key.strip()
        C.parse_overrides([f"{key}="])  # unknown key -> ConfigError with a suggestion
        values = split_values(value)
        if key == "data.final" or (key == "out" and len(values) > 1):
            raise C.ConfigError(f"config key '{key}' cannot be swept or set here: {RESERVED_KEYS[key]}")
        fixed.pop(key, None)
        swept.pop(key, None)
        if len(values) == 1:
            fixed[key] = values[0]
            continue
        if any(v.strip() == "" for v in values):
            raise C.ConfigError(f"empty value in the list for config key '{key}': {value!r}")
        unique, seen = [], set()
        for v in values:
            marker = _parsed_marker(v)
            if marker not in seen:
                seen.add(marker)
                unique.append(v.strip())
        if len(unique) == 1:
            fixed[key] = unique[0]
        else:
            swept[key] = unique
    return [f"{k}={v}" for k, v in fixed.items()], swept


def _parsed_marker(value: str) -> str:
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
        parsed = float(parsed)
    return repr(parsed)


def build_grid(grid: str, fixed: Sequence[str], swept: Dict[str, List[str]]) -> Dict[str, List[str]]:
    """The swept keys in grid order: the preset's keys (unless the user set them), then the user's."""
    if grid not in GRIDS:
        raise C.ConfigError(f"unknown grid {grid!r}; choose one of {sorted(GRIDS)}")
    fixed_keys = {item.split("=", 1)[0] for item in fixed}
    out: Dict[str, List[str]] = {}
    for key, values in GRIDS[grid].items():
        if key in swept:
            out[key] = swept[key]
        elif key not in fixed_keys:
            out[key] = list(values)
    for key, values in swept.items():
        out.setdefault(key, values)
    return out


def grid_points(grid: Dict[str, List[str]]) -> List[Dict[str, str]]:
    """Cartesian product in grid order (the last key varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


def point_name(point: Dict[str, str], long: bool = False) -> str:
    if not point:
        return "default"
    parts = []
    for key, value in point.items():
        if key in ALIASES and not long:
            parts.append(f"{ALIASES[key]}{_safe(value)}")
        else:
            parts.append(f"{_safe(key if long else key.rsplit('.', 1)[-1])}-{_safe(value)}")
    return "_".join(parts)


def point_names(points: List[Dict[str, str]]) -> List[str]:
    names = [point_name(p) for p in points]
    if len(set(names)) < len(names):
        names = [point_name(p, long=True) for p in points]
    if len(set(names)) < len(names):  # values that differ only in characters a folder name cannot hold
        names = [f"{i:03d}_{n}" for i, n in enumerate(names)]
    return names


def _yaml_value(value: str) -> Any:
    try:
        return yaml.safe_load(value) if value.strip() != "" else ""
    except yaml.YAMLError:
        return value


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

    @property
    def label(self) -> str:
        return f"[{self.index}/{self.total}] {self.kind} {self.name}"


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
                "epochs_run": res.get("epochs"), "final": res.get("final"), "train_time_s": res.get("train_time_s")}
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
            epochs = max(epochs, int(rec.get("epoch", -1)) + 1)
    return {"val_top1": max(vals) if vals else None, "test_top1": None, "epochs_run": epochs}


def _flat(cfg: C.RunConfig) -> Dict[str, Any]:
    out: Dict[str, Any] = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v
    walk(C.to_dict(cfg), "")
    return out


def check_same_run(job: Job) -> None:
    """A folder left by an earlier sweep must hold the same run, or restarting would mix settings."""
    folder = job.folder
    saved = folder / TRIAL_CONFIG if (folder / TRIAL_CONFIG).exists() else folder / RUN_CONFIG
    if not saved.exists() or job.cfg is None:
        return
    try:
        old = _flat(C.load_config(str(saved)))
    except C.ConfigError as e:
        raise SweepError(f"{folder} holds a run whose config cannot be read ({e}); "
                         f"delete that folder or choose another out=") from None
    new = _flat(job.cfg)
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in new
             if k not in RESTART_FREE_KEYS and old.get(k) != new.get(k)]
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


# -- executors ----------------------------------------------------------------------------------
OnStart = Callable[[Job], None]
OnEnd = Callable[[Job, str, Optional[str]], None]   # job, status (done|failed|stopped), error


class InlineExecutor:
    """Runs the jobs one after another in this process (tests; a debugger; backbones registered here)."""
    name = "inline"
    supports_early_stop = False

    def describe(self) -> str:
        return "inline, one run at a time in this process"

    def run(self, jobs: List[Job], on_start: OnStart, on_end: OnEnd, early_stop: bool = False) -> None:
        from ..engine import trainer
        for job in jobs:
            on_start(job)
            try:
                trainer.train(job.cfg, resume=job.resume)
            except Exception as e:  # a failed run is recorded; the sweep goes on
                write_error(job.folder, format_error(e), traceback.format_exc())
                on_end(job, "failed", format_error(e))
                continue
            if (job.folder / RESULTS).exists():
                on_end(job, "done", None)
            else:
                on_end(job, "failed", "the run ended without writing results.json")


def _visible_gpus() -> List[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [x.strip() for x in env.split(",") if x.strip() and x.strip() != "-1"]
        if not ids:
            return []
    try:
        import torch
        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA means CPU workers
        return []
    if env is not None:
        return ids[:count]
    return [str(i) for i in range(count)]


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_INTERRUPTED = {130, -2, -15, 143}


class ProcessExecutor:
    """One subprocess per run (``python -m gapt.protocol.sweep --worker trial.yaml``), ``workers`` at once.

    Subprocesses rather than a multiprocessing pool: a crash (segfault, out-of-memory kill, a CUDA
    error that poisons the context) ends one run, not the sweep; each worker sets
    CUDA_VISIBLE_DEVICES before CUDA starts; and its output goes to the run's train.log.
    """
    name = "process"
    supports_early_stop = False

    def __init__(self, workers: Optional[int] = None, preload: Sequence[str] = (), use_gpus: bool = True,
                 python: str = sys.executable):
        gpus = _visible_gpus() if use_gpus else []
        if workers is None or workers <= 0:
            workers = len(gpus) or 1
        self.workers = workers
        self.gpus = gpus
        self.slots = [gpus[i % len(gpus)] for i in range(workers)] if gpus else [None] * workers
        self.threads = None if gpus else max(1, _cpu_count() // workers)
        self.preload = list(preload)
        self.python = python

    def describe(self) -> str:
        if self.gpus:
            return f"{self.workers} worker process(es) on GPU(s) {','.join(self.gpus)}"
        return f"{self.workers} CPU worker process(es), {self.threads} torch thread(s) each"

    def command(self, job: Job) -> List[str]:
        cmd = [self.python, "-m", "gapt.protocol.sweep", "--worker", str(job.folder / TRIAL_CONFIG)]
        if job.resume:
            cmd.append("--resume")
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        for p in self.preload:
            cmd += ["--preload", str(Path(p).resolve()) if p.endswith(".py") else p]
        return cmd

    def _env(self, slot: Optional[str]) -> Dict[str, str]:
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
            env["GAPT_SWEEP_GPU"] = "1"
        else:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads or 1)
        return env

    def run(self, jobs: List[Job], on_start: OnStart, on_end: OnEnd, early_stop: bool = False) -> None:
        from concurrent.futures import ThreadPoolExecutor, as_completed
        slots: "queue.Queue[Optional[str]]" = queue.Queue()
        for s in self.slots:
            slots.put(s)
        stopping = threading.Event()
        procs: Dict[str, subprocess.Popen] = {}
        lock = threading.Lock()

        def work(job: Job) -> Optional[int]:
            slot = slots.get()
            try:
                if stopping.is_set():
                    return None
                on_start(job)
                with open(job.folder / WORKER_LOG, "a") as logf:
                    logf.write(f"--- {_dt.datetime.now().isoformat(timespec='seconds')} "
                               f"{' '.join(self.command(job))}\n")
                    logf.flush()
                    proc = subprocess.Popen(self.command(job), stdout=logf, stderr=subprocess.STDOUT,
                                            env=self._env(slot), cwd=os.getcwd())
                    with lock:
                        procs[job.name] = proc
                    rc = proc.wait()
                with lock:
                    procs.pop(job.name, None)
                return rc
            finally:
                slots.put(slot)

        pool = ThreadPoolExecutor(max_workers=len(self.slots), thread_name_prefix="gapt-sweep")
        futures = {pool.submit(work, job): job for job in jobs}
        try:
            for fut in as_completed(futures):
                job, rc = futures[fut], fut.result()
                if rc is None:
                    continue
                if (job.folder / RESULTS).exists() and rc == 0:
                    on_end(job, "done", None)
                    continue
                if rc in _INTERRUPTED and stopping.is_set():
                    continue
                message = read_error(job.folder) or self._exit_message(job, rc)
                if not (job.folder / ERROR_FILE).exists():
                    write_error(job.folder, message)
                on_end(job, "failed", message)
        except BaseException:
            stopping.set()
            with lock:
                running = list(procs.values())
            for proc in running:
                if proc.poll() is None:
                    proc.terminate()
            for proc in running:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)

    @staticmethod
    def _exit_message(job: Job, rc: int) -> str:
        if rc < 0:
            why = f"killed by signal {-rc}" + (" (out of memory?)" if rc == -9 else "")
        elif rc == 0:
            why = "exited without writing results.json"
        else:
            why = f"exited with code {rc}"
        tail = ""
        logfile = job.folder / WORKER_LOG
        if logfile.exists():
            lines = [l for l in logfile.read_text(errors="replace").splitlines() if l.strip()]
            if lines:
                tail = f"; last output: {lines[-1][-300:]}"
        return f"worker {why}{tail} (see {logfile})"


def make_executor(backend: str = "local", workers: Optional[int] = None, preload: Sequence[str] = (),
                  use_gpus: bool = True, **ray_options):
    """``local`` with workers == 0 runs inline, else worker processes; ``ray`` needs ``pip install gapt[ray]``."""
    if backend == "ray":
        try:
            from .sweep_ray import RayExecutor
        except ImportError as e:
            raise SweepError(f"--backend ray needs Ray Tune, which is not installed: pip install gapt[ray] "
                             f"({e})") from None
        return RayExecutor(workers=workers, preload=preload, **ray_options)
    if backend != "local":
        raise SweepError(f"unknown sweep backend {backend!r}; choose local or ray")
    if ray_options.get("early_stop"):
        raise SweepError("--early-stop needs --backend ray (ASHA stops trials from their per-epoch reports)")
    if workers == 0:
        return InlineExecutor()
    return ProcessExecutor(workers=workers, preload=preload, use_gpus=use_gpus)


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


def _summary(finals: List[Dict[str, Any]]) -> Dict[str, Any]:
    values = [f["test_top1"] for f in finals if f.get("status") == "done" and f.get("test_top1") is not None]
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
        "trials": [], "choice": None, "finals": [], "final_test_top1": None,
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
        pending = _classify(finals, progress, retry_failed)
        state["finals"] = [progress.records[("final", j.name)] for j in finals]
        progress.write()
        _run(executor, pending, progress, False)
        state["finals"] = [progress.records[("final", j.name)] for j in finals]
        _check_complete(finals, progress, state, out)
        state["final_test_top1"] = _summary(state["finals"])
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
        rows.append(("", f"final/{f['name']}", f.get("status", "?"), _fmt_num(f.get("val_top1")),
                     _fmt_num(f.get("test_top1")), str(f.get("epochs_run", "-")), (f.get("error") or "")[:80]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) if i in (1, 2, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              .rstrip(), file=file)
    s = state.get("final_test_top1") or {}
    if s.get("n"):
        std = f" +- {s['std']:.2f}" if s.get("std") is not None else ""
        print(f"final test top-1 ({chosen}, {s['n']} seed(s)): {s['mean']:.2f}{std}", file=file)


# -- whole benchmarks ---------------------------------------------------------------------------
PRESETS = Path(__file__).resolve().parents[1] / "configs"


def benchmark_tasks(benchmark: str, backbone: str, presets: Optional[Path] = None) -> List[Tuple[str, Path]]:
    """(name, preset file) for every preset of ``benchmark`` and ``backbone``, in the paper's order."""
    from .paper import FGVC_TASKS, VTAB_TASKS
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


# -- worker process -----------------------------------------------------------------------------
def _worker_main(argv: Optional[List[str]] = None) -> int:
    """``python -m gapt.protocol.sweep --worker trial.yaml [--resume]``: one run, its error to error.json."""
    p = argparse.ArgumentParser(prog="gapt-sweep-worker")
    p.add_argument("--worker", required=True, metavar="TRIAL_YAML")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--preload", action="append", default=[])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    folder = Path(args.worker).parent
    try:
        load_preload(args.preload)
        import torch
        if args.threads:
            torch.set_num_threads(args.threads)
        cfg = C.load_config(args.worker)
        cfg = localize_device(dataclasses.replace(cfg, out=str(folder)), os.environ.get("GAPT_SWEEP_GPU") == "1")
        from ..engine.trainer import train
        train(cfg, resume=args.resume)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - recorded for the sweep
        write_error(folder, format_error(e), traceback.format_exc())
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
