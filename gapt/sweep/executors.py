"""Executors that run a sweep's jobs, and the worker process they launch.

:class:`InlineExecutor` (one run at a time in this process), :class:`ProcessExecutor` (one
subprocess per run: ``python -m gapt.sweep.executors --worker trial.yaml``, one GPU
each, or CPU threads split between workers), :func:`make_executor` (which also picks Ray's,
:mod:`.ray_tune`) and the worker's entry point.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import logging
import os
import queue
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .. import config as C
from ..engine.runfolder import RESULTS
from .jobs import (
    ERROR_FILE,
    TRIAL_CONFIG,
    WORKER_LOG,
    Job,
    OnEnd,
    OnStart,
    SweepError,
    call_target,
    format_error,
    load_preload,
    localize_device,
    read_error,
    resolve_runner,
    write_error,
)


# -- executors ----------------------------------------------------------------------------------
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
                if job.target:
                    call_target(job.target, job.folder, job.resume)
                else:
                    train = resolve_runner(job.runner) if job.runner else trainer.train
                    train(job.cfg, resume=job.resume)
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
    """One subprocess per run (``python -m gapt.sweep.executors --worker trial.yaml``), ``workers`` at once.

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
        cmd = [self.python, "-m", "gapt.sweep.executors", "--worker", str(job.folder / TRIAL_CONFIG)]
        if job.target:
            cmd += ["--target", job.target]
        if job.resume:
            cmd.append("--resume")
        if job.runner:
            cmd += ["--runner", job.runner]
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
            from .ray_tune import RayExecutor
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


# -- worker process -----------------------------------------------------------------------------
def _worker_main(argv: Optional[List[str]] = None) -> int:
    """``python -m gapt.sweep.executors --worker trial.yaml [--resume]``: one run, its error to error.json."""
    p = argparse.ArgumentParser(prog="gapt-sweep-worker")
    p.add_argument("--worker", required=True, metavar="TRIAL_YAML")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--preload", action="append", default=[])
    p.add_argument("--runner", default="", help="module:function that trains the config (default: the trainer)")
    p.add_argument("--target", help="module:function to run on the job folder instead of training")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    folder = Path(args.worker).parent
    try:
        load_preload(args.preload)
        import torch
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.target:
            call_target(args.target, folder, args.resume)
            return 0
        cfg = C.load_config(args.worker)
        cfg = localize_device(dataclasses.replace(cfg, out=str(folder)), os.environ.get("GAPT_SWEEP_GPU") == "1")
        train = resolve_runner(args.runner)
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
