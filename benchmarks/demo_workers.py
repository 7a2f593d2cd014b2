"""demo_workers: the demo's runs side by side in single-threaded worker processes vs one at a time.

Candidate: ``gapt.demo.workers.RunPool`` with one worker per core (the demo's default), one torch
thread each, starting the pool (spawn + imports) inside the timing. Baseline: the same runs one
after another in this process with one torch thread per core (how the demo ran before). The runs
are the demo's kind: ``mae_vit_micro`` at 32x32 on shapes/count, vpt-deep, 8 prompts, each a
whole ``gapt.engine.trainer.train`` run (val every epoch, test at the end). Always wall clock:
parallelism is what is measured.
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import itertools
import os
import tempfile
from typing import List, Optional

import torch

from benchmarks._common import Clock, Result, main_for, paired, quiet

NAME = "demo_workers"


def _train_quietly(cfg) -> float:
    """One run (a worker's job, so module level: it is pickled by name)."""
    from gapt.engine.trainer import train
    with quiet():
        return train(cfg)["metrics"]["test_top1"]


def run(quick: bool = False, device: Optional[torch.device] = None, clock: Optional[Clock] = None,
        runs: Optional[int] = None, epochs: Optional[int] = None, num_samples: Optional[int] = None,
        workers: Optional[int] = None, repeats: Optional[int] = None, **_) -> List[Result]:
    from gapt.config import load_config
    from gapt.demo.workers import RunPool, default_workers

    workers = workers or max(2, default_workers())
    runs = runs or (2 * workers if quick else 4 * workers)
    epochs = epochs or (1 if quick else 2)
    num_samples = num_samples or (128 if quick else 500)
    repeats = repeats or 1
    wall = Clock("wall", torch.device("cpu"))
    counter = itertools.count()
    with tempfile.TemporaryDirectory(prefix="gapt-bench-demo-workers-") as root:
        def configs():
            return [load_config(overrides=[
                "data.format=shapes", "data.name=count", f"data.num_samples={num_samples}", "data.num_workers=0",
                "backbone=mae_vit_micro", "weights=null", "image_size=32", "method=vpt-deep", "num_prompts=8",
                f"train.epochs={epochs}", "train.warmup_epochs=0", "train.batch_size=32", "device=cpu",
                f"out={os.path.join(root, f'run{next(counter)}')}"]) for _ in range(runs)]

        def one_at_a_time():
            threads = torch.get_num_threads()
            torch.set_num_threads(workers)
            try:
                for cfg in configs():
                    _train_quietly(cfg)
            finally:
                torch.set_num_threads(threads)

        def side_by_side():
            with RunPool(workers, threads=1) as pool:
                for i, cfg in enumerate(configs()):
                    pool.submit(i, _train_quietly, cfg)
                while pool.pending:
                    pool.next()

        t = paired(one_at_a_time, side_by_side, repeats, wall, warmup=0)
    detail = (f"{runs} whole runs (vpt-deep, 8 prompts, mae_vit_micro random weights 32px, shapes/count "
              f"train {num_samples}, {epochs} epoch(s), batch 32): {workers} single-threaded worker processes "
              f"(pool start included) vs one at a time with {workers} threads, wall clock on "
              f"{os.cpu_count()} CPU(s): {t.baseline_s:.1f}s -> {t.candidate_s:.1f}s, {t.spread()}")
    return [Result(NAME, t.ratio, detail, extra={"timing": t})]


def _args(p):
    p.add_argument("--runs", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)


if __name__ == "__main__":
    main_for(run, __doc__.splitlines()[0], _args)
