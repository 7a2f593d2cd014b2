"""Run the demo's independent runs side by side in a few worker processes.

The demo's runs are tiny (a 6-block, 64-wide ViT on 32x32 images) and one run keeps two torch
threads only partly busy, so runs side by side in single-threaded processes use the cores better: on 2
cores the whole demo took 182 s this way against 298 s one run at a time on 2 threads
(benchmarks/demo_workers.py measures 8 plain vpt-deep runs: 1.14x). Each run is seeded by its
own config and runs on one thread in any worker, so which worker runs it does not change its
numbers.

``workers=1`` runs everything in this process, in submission order (a debugger; the tests of
the rules). Worker processes are started with ``spawn`` (no forked torch state) and end with
this process, even when it is killed with SIGKILL, so a rerun never races an orphan writing
into the same run folder.
"""
from __future__ import annotations

import logging
import os
import queue
import sys
import threading
from typing import Any, Callable, Hashable, Optional, Tuple

MAX_WORKERS = 8


def default_workers() -> int:
    """One worker per core, at most MAX_WORKERS (the demo rarely has more runs ready at once)."""
    return max(1, min(MAX_WORKERS, _cpu_count()))


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # macOS, Windows
        return os.cpu_count() or 1


def _end_with_parent(parent: int) -> None:
    """Make this worker exit when the process that started it is gone."""
    if sys.platform.startswith("linux"):
        try:   # the kernel sends SIGKILL at once when the parent dies: PR_SET_PDEATHSIG = 1
            import ctypes
            import signal
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:   # it died before prctl took effect
        os._exit(1)

    def watch() -> None:   # elsewhere (and as a second line): poll the parent
        import time
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="gapt-demo-parent-watch").start()


def _init_worker(parent: int, threads: int) -> None:
    import signal
    _end_with_parent(parent)
    # Ctrl-C reaches the whole process group: the parent stops the workers itself (RunPool.close),
    # so a worker should not print a KeyboardInterrupt traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch
    torch.set_num_threads(threads)
    # the parent prints one line per finished run; per-epoch lines and bars from several
    # processes at once would interleave into noise
    logging.getLogger("gapt").setLevel(logging.WARNING)
    from ..engine import progress
    progress.BARS = False


class WorkerDied(RuntimeError):
    """A worker process ended in the middle of a run (killed, out of memory, a crash)."""


class RunPool:
    """Submit calls tagged with a key; :meth:`next` returns ``(key, result)`` as each finishes.

    A call that raises re-raises its exception from :meth:`next`; a worker that dies makes
    :meth:`next` raise :class:`WorkerDied` instead of waiting forever. Use as a context manager:
    leaving it (also by an exception or Ctrl-C) stops the workers.
    """

    def __init__(self, workers: int = 1, threads: int = 1):
        self.workers = max(1, int(workers))
        self._done: "queue.Queue[Tuple[Hashable, Any]]" = queue.Queue()
        self._pending = 0
        self._pool = None
        if self.workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(os.getpid(), max(1, threads)))

    def submit(self, key: Hashable, fn: Callable, *args) -> None:
        self._pending += 1
        if self._pool is None:
            from concurrent.futures import Future
            done: Future = Future()
            try:
                done.set_result(fn(*args))
            except Exception as e:  # noqa: BLE001 - re-raised by next(), as a worker's would be
                done.set_exception(e)
            self._done.put((key, done))
            return
        self._pool.submit(fn, *args).add_done_callback(lambda fut: self._done.put((key, fut)))

    @property
    def pending(self) -> int:
        return self._pending

    def next(self) -> Tuple[Hashable, Any]:
        from concurrent.futures.process import BrokenProcessPool
        if self._pending == 0:
            raise RuntimeError("no submitted call is left to wait for")
        key, fut = self._done.get()
        self._pending -= 1
        error = fut.exception()
        if isinstance(error, BrokenProcessPool):
            raise WorkerDied("a worker process died in the middle of a run (killed, out of memory, or a "
                             "crash); finished runs are kept: run the same command again to continue") from error
        if error is not None:
            raise error
        return key, fut.result()

    def close(self, wait: bool = True) -> None:
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        if not wait:   # stop runs in flight now instead of letting them finish
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
        pool.shutdown(wait=True, cancel_futures=not wait)

    def __enter__(self) -> "RunPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(wait=exc_type is None)
