"""Run every benchmark and print one line each: ``NAME: X.XXx (what was compared, sizes, device)``.

    python benchmarks/run_all.py --quick          # reduced sizes: under 3 minutes on 2 CPU cores
    python benchmarks/run_all.py                  # the full sizes
    python benchmarks/run_all.py --only train_step,memory --budget-gb 16

Every figure is a ratio measured in this process (baseline / gapt, alternating runs, median
of the per-pair ratios). On CPU the clock is the process's CPU time with one thread unless
``--threads``/``--clock`` say otherwise (see benchmarks/_common.py). Exit status 1 if a
benchmark failed; a target that is not met is reported in its line, not as a failure.
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import importlib
import json
import sys
import time
import traceback
from typing import List, Optional

import torch

from benchmarks._common import Result, arg_parser, resolve_device, setup

BENCHMARKS = ("train_step", "eval_throughput", "frozen_cache", "linear_probe_cache", "vtab_data_path",
              "fgvc_data_path", "memory", "protocol", "demo_workers")


def run_all(names=BENCHMARKS, quick: bool = False, device: Optional[torch.device] = None, clock=None,
            budget_gb: float = 8.0, log=sys.stderr) -> List[Result]:
    device = device or resolve_device()
    results: List[Result] = []
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        start = time.perf_counter()
        try:
            out = module.run(quick=quick, device=device, clock=clock, budget_gb=budget_gb)
        except Exception as e:  # noqa: BLE001 - one broken benchmark must not hide the others
            traceback.print_exc(file=log)
            out = [Result(name, None, f"{type(e).__name__}: {e}", failed=True)]
        for r in out:
            print(r.line(), flush=True)
        print(f"  ({name}: {time.perf_counter() - start:.0f}s wall)", file=log, flush=True)
        results.extend(out)
    return results


def main(argv=None) -> int:
    p = arg_parser(__doc__.splitlines()[0])
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    p.add_argument("--budget-gb", type=float, default=8.0, help="memory budget for the largest-batch search")
    p.add_argument("--json", default="", help="also write the results (ratios, targets, lines) to this file")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    device = resolve_device(args.device)
    clock = setup(args.threads, args.clock, device)
    start = time.perf_counter()
    print(f"gapt benchmarks{' (quick)' if args.quick else ''}: torch {torch.__version__}, {clock.describe()}",
          file=sys.stderr, flush=True)
    results = run_all(names, args.quick, device, clock, args.budget_gb)
    print(f"  (total {time.perf_counter() - start:.0f}s wall)", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"name": r.name, "ratio": r.ratio, "target": r.target, "met": r.met, "failed": r.failed,
                        "line": r.line()} for r in results], f, indent=2)
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
