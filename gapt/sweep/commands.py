"""`gapt sweep`: a learning-rate (or any key) grid on val, then final runs with several seeds."""
from __future__ import annotations

import argparse
import json
import sys

from ..config import ConfigError, config_file_hint

BENCHMARKS = ("fgvc", "vtab")

DESCRIPTION = """\
Search a grid on the val split, pick the best trial by val top-1, then train the final runs
(data.final=true) with --seeds seeds and write sweep.json under the config's out.

  gapt sweep --config fgvc/mae_vitb16/cub weights=mae.pth data.root=/data/CUB_200_2011
  gapt sweep --config vtab/mae_vitb16/dtd num_prompts=1,5,10,50,100 train.lr=0.1,0.5,1.0
  gapt sweep --config fgvc/mae_vitb16/cub --grid vpt --backend ray --ray-address auto --early-stop asha
  gapt sweep fgvc --root /data/fgvc --backbone mae_vitb16 --weights mae.pth
  gapt sweep vtab --root /data/vtab-1k --backbone mocov3_vitb16 --weights linear-vit-b-300ep.pth.tar

KEY=a,b,c sweeps a key (write \\, for a literal comma), KEY=a fixes it. The default grid is
SPEC §6's train.lr in {0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0}; --grid vpt is VPT's lr x weight
decay grid; --grid none sweeps only the keys given. A key you give replaces the grid's entry.
Rerunning the same command continues a killed sweep: finished runs are kept, interrupted ones
resume from their last.pt, failed ones are kept as failed unless --retry-failed."""


def cmd_sweep(args) -> int:
    from .jobs import SweepError
    from .benchmark import run_benchmark
    from .run import run_sweep
    items = list(args.items)
    benchmark = items.pop(0) if items and items[0] in BENCHMARKS else None
    bad = [i for i in items if "=" not in i]
    if bad:
        raise ConfigError(f"'{bad[0]}' is not KEY=VALUE" + (f" (benchmarks: {', '.join(BENCHMARKS)}, given first)"
                                                            if bad[0] in BENCHMARKS else config_file_hint(bad[0])))
    ray_options = {"address": args.ray_address, "cpus_per_trial": args.cpus_per_trial,
                   "asha_grace": args.asha_grace, "asha_reduction": args.asha_reduction}
    if args.backend != "ray":
        given = [k for k in ("ray_address", "cpus_per_trial") if getattr(args, k) is not None]
        if given:
            raise SweepError(f"--{given[0].replace('_', '-')} needs --backend ray")
        ray_options = {}
    common = dict(grid=args.grid, seeds=args.seeds, backend=args.backend, workers=args.workers,
                  preload=args.preload, early_stop=args.early_stop, retry_failed=args.retry_failed,
                  ray_options=ray_options)
    if benchmark:
        if args.config:
            raise SweepError(f"gapt sweep {benchmark} takes its configs from the presets; drop --config")
        if not args.root or not args.backbone:
            raise SweepError(f"gapt sweep {benchmark} needs --root DIR and --backbone NAME")
        if args.dry_run:
            raise SweepError("--dry-run works with --config")
        summary = run_benchmark(benchmark, args.root, args.backbone, weights=args.weights, overrides=items,
                                out=args.out, tasks=args.tasks.split(",") if args.tasks else None, **common)
        return 1 if summary["failed"] else 0
    extra = [k for k in ("root", "backbone", "weights", "tasks", "out") if getattr(args, k)]
    if extra:
        raise SweepError(f"--{extra[0]} is for gapt sweep fgvc/vtab; with --config use KEY=VALUE overrides "
                         f"(e.g. {'data.root' if extra[0] == 'root' else extra[0]}=...)")
    if not args.config and not items:
        raise SweepError("give --config FILE (and KEY=VALUE overrides), or a benchmark: gapt sweep fgvc|vtab ...")
    state = run_sweep(args.config, items, dry_run=args.dry_run, **common)
    if args.dry_run:
        if args.json:
            print(json.dumps(state, indent=2))
        else:
            print(f"sweep folder: {state['out']}  ({len(state['trials'])} trial(s), then {state['seeds']} final seed(s))")
            for t in state["trials"]:
                print(f"  {t['name']:28s} {t['status']:8s} {' '.join(f'{k}={v}' for k, v in t['overrides'].items())}"
                      f"{'  ' + t['error'] if t.get('error') else ''}")
        return 0
    failed = [t["name"] for t in state["trials"] + state.get("finals", []) if t.get("status") == "failed"]
    if failed:  # exit non-zero so that schedulers and CI notice, after the summary
        print(f"{len(failed)} run(s) failed: {', '.join(failed)} (errors in sweep.json)", file=sys.stderr)
    return 0 if state["status"] == "done" and not failed else 1


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # a scheduler's SIGTERM stops the sweep like Ctrl-C: workers end, sweep.json says so


def _main_wrapper(args) -> int:
    import signal
    import threading

    from .jobs import SweepError
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        return cmd_sweep(args)
    except SweepError as e:
        print(f"gapt sweep: error: {e}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def add_commands(subparsers) -> None:
    s = subparsers.add_parser("sweep", help="grid search on val, then final runs with several seeds (SPEC §6)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("items", nargs="*", metavar="[fgvc|vtab] KEY=VALUE",
                   help="overrides; KEY=a,b,c sweeps KEY. A first word fgvc or vtab sweeps a whole benchmark")
    s.add_argument("--config", help="YAML config file, or a packaged preset by name (e.g. vtab/mae_vitb16/dtd; see `gapt presets`)")
    s.add_argument("--grid", default="spec",
                   choices=["spec", "vpt", "vipamin", "spt", "davpt", "adamw", "vfpt", "e2vpt", "none"],
                   help="preset grid: spec (lr, SPEC §6; default), vpt (lr x weight decay), "
                        "vipamin (lr x (k, lambda), SPEC §12.2), spt (AdamW lr), davpt (DA-VPT's AdamW lrs, "
                        "1e-4..1e-2), adamw (those and 5e-2), vfpt / e2vpt (VPT's lr x wd grid at batch / 256 = 64 / 256, "
                        "128 / 256, SPEC §12.3-12.4), none")
    s.add_argument("--seeds", type=int, default=3, help="final runs: seeds train.seed + 0..N-1 (0: no finals)")
    s.add_argument("--workers", type=int, default=None,
                   help="runs at once: default one per GPU, else 1; 0 runs inline in this process")
    s.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="local worker processes, or Ray Tune (pip install gapt[ray])")
    s.add_argument("--ray-address", default=None, help="'auto' joins a running Ray cluster (default: a local one)")
    s.add_argument("--cpus-per-trial", type=float, default=None, help="Ray: CPUs per trial without GPUs")
    s.add_argument("--early-stop", default=None, choices=["asha", "none"],
                   help="asha: stop weak trials early on val top-1 (Ray backend)")
    s.add_argument("--asha-grace", type=int, default=None,
                   help="ASHA: epochs before the first cut (default train.warmup_epochs)")
    s.add_argument("--asha-reduction", type=float, default=3.0, help="ASHA: reduction factor")
    s.add_argument("--retry-failed", action="store_true", help="run failed and early-stopped trials again")
    s.add_argument("--preload", action="append", default=[], metavar="MODULE|FILE.py",
                   help="import this in every worker first (e.g. a module registering a custom backbone)")
    s.add_argument("--dry-run", action="store_true", help="list the trials and their state, run nothing")
    s.add_argument("--json", action="store_true", help="--dry-run: print JSON")
    b = s.add_argument_group("benchmarks (gapt sweep fgvc|vtab)")
    b.add_argument("--root", help="folder holding the datasets (FGVC: CUB_200_2011/...; VTAB: <task>/)")
    b.add_argument("--backbone", help="preset backbone, e.g. mae_vitb16 or mocov3_vitb16")
    b.add_argument("--weights", help="backbone checkpoint file")
    b.add_argument("--tasks", help="comma-separated subset of datasets/tasks")
    b.add_argument("--out", help="benchmark folder (default runs/sweep/<benchmark>-<backbone>); one sweep per "
                                 "dataset beneath it")
    s.set_defaults(func=_main_wrapper)
