"""`gapt reproduce TABLE`: plan the runs of a paper table, run them, write the table beside the paper's."""
from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
Train every run a table of the paper needs and write it beside the paper's numbers (SPEC §8):
Ours with the paper's settings (Table 5 presets), rows the paper gives no settings for with
SPEC §6's lr search on val. Runs go through the sweep executors (local workers or Ray): a
rerun of the same command keeps finished runs, resumes interrupted ones, lists failed ones.

  gapt reproduce table4 --data-root /data/fgvc --weights mae_pretrain_vit_base.pth
  gapt reproduce table1 --data-root /data/fgvc --weights mae_vitb16=mae.pth --weights mocov3_vitb16=moco.pth.tar
  gapt reproduce table1 --data-root /data/fgvc --backbone mae_vitb16 --weights mae.pth --dry-run
  gapt reproduce table2 --data-root /data/vtab-1k --backbone mocov3_vitb16 --weights moco.pth.tar --workers 4
  gapt reproduce table4 --data-root /data/fgvc --weights mae.pth train.epochs=1   # a smoke run
  gapt reproduce table1 --data-root /data --dry-run --time-per-image 0.0044   # inputs, runs, work, time
  gapt reproduce table5       # Table 5 from the shipped presets beside SPEC's copy (exit 1 if one differs)
  gapt reproduce peers --benchmark vtab --backbone mae_vitb16 --data-root /data/vtab-1k --weights mae.pth
                              # every peer method (SPEC §12.7) with its recipe: peers.md, ours beside published
  gapt reproduce peers --benchmark fgvc --backbone mocov3_vitb16 --methods da-vpt,da-vpt+,gated --dry-run

--data-root is one folder holding the datasets in their documented layouts: FGVC
CUB_200_2011/ OxfordFlower/ Stanford-cars/ Stanford-dogs/ nabirds/; VTAB-1k <task>/;
ADE20K ADEChallengeData2016/. Outputs under --out (default runs/reproduce/TABLE): one folder
per cell, reproduce.json, TABLE.md and TABLE.csv (each cell: ours, paper, difference). Ours is
the test top-1 of the last epoch, the protocol the paper used (the CSV's ours_best_val: the best
held-out-val epoch's, for reference)."""


def cmd_reproduce(args) -> int:
    from pathlib import Path

    from .plans import PLANS, ReproduceError, get_plan
    from .inputs import dry_run, parse_weights, plan_backbones
    from .render import render_plan
    from .runner import run_plan
    if args.table == "table5":  # settings, not results: the shipped presets beside SPEC §8's copy
        from .table5 import run_table5
        return run_table5(as_json=args.json, out=Path(args.out) if args.out else None)
    try:
        if args.table == "peers":  # every peer method's runs on one benchmark / backbone (SPEC §12.7)
            plan = PLANS["peers"](benchmark=args.benchmark, backbone=args.backbone,
                                  methods=args.methods.split(",") if args.methods else None)
        elif args.benchmark or args.methods:
            raise ReproduceError("--benchmark and --methods are for `gapt reproduce peers`")
        else:
            plan = get_plan(args.table)
        if args.backbone:
            have = plan_backbones(plan)
            if args.backbone not in have:
                raise ReproduceError(f"{args.table} has no backbone {args.backbone!r}; it uses {', '.join(have)}")
            plan.specs = [s for s in plan.specs if s.backbone == args.backbone]
            if getattr(plan, "backbones", None):  # a DIP figure: its rows are backbones
                plan.backbones = [args.backbone]
        bad = [i for i in args.overrides if "=" not in i]
        if bad:
            raise ReproduceError(f"'{bad[0]}' is not KEY=VALUE (tables: {', '.join(PLANS)})")
        out = Path(args.out or f"runs/reproduce/{args.table}")
        if args.render_only:
            paths = render_plan(plan, out, args.seeds)
            print(paths[0].read_text())
            return 0
        if args.dry_run:
            from .workload import format_dry_run
            weights = parse_weights(args.weights, plan_backbones(plan))
            try:
                info = dry_run(plan, out, Path(args.data_root or "."), weights, args.overrides, args.seeds,
                               time_per_image=args.time_per_image)
            except ValueError as e:
                raise ReproduceError(str(e)) from None
            print(json.dumps(info, indent=2) if args.json else format_dry_run(info))
            return 0
        if not args.data_root:
            raise ReproduceError("give --data-root DIR (the folder holding the benchmark's datasets)")
        ray_options = {"address": args.ray_address} if args.backend == "ray" else {}
        state = run_plan(plan, out, args.data_root, weights=args.weights, overrides=args.overrides,
                         seeds=args.seeds, backend=args.backend, workers=args.workers, preload=args.preload,
                         retry_failed=args.retry_failed, ray_options=ray_options)
        paths = render_plan(plan, out, args.seeds)
        print(paths[0].read_text())
        print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)
        if state["failed"]:
            print(f"{len(state['failed'])} cell(s) failed or unfinished:", file=sys.stderr)
            for name, err in state["failed"].items():
                print(f"  {name}: {err}", file=sys.stderr)
            return 1
        return 0
    except ReproduceError as e:
        print(f"gapt reproduce: error: {e}", file=sys.stderr)
        return 1


def _main_wrapper(args) -> int:
    from ..sweep.jobs import SweepError
    try:
        return cmd_reproduce(args)
    except SweepError as e:
        print(f"gapt reproduce: error: {e}", file=sys.stderr)
        return 1


def add_commands(subparsers) -> None:
    r = subparsers.add_parser("reproduce", help="train the runs of a paper table or figure, then write it beside the paper's",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("table", help="table1, table2, table3, table4, table6, table7, table8, or a figure: fig1, fig2, "
                                 "fig4, fig5, fig6, fig7, fig8, fig9, fig10, fig11; table5 prints the shipped presets beside "
                                 "SPEC's Table 5; peers: every peer method beside its published numbers (SPEC §12.7)")
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="applied to every run (e.g. train.epochs=1)")
    r.add_argument("--data-root", help="folder holding the benchmark's datasets in their documented layouts")
    r.add_argument("--weights", action="append", default=[], metavar="FILE|BACKBONE=FILE",
                   help="backbone checkpoint; BACKBONE=FILE once per backbone when the table has several")
    r.add_argument("--backbone", help="run only this backbone's rows (e.g. mae_vitb16)")
    r.add_argument("--benchmark", choices=["fgvc", "vtab"], help="peers: the benchmark (default both)")
    r.add_argument("--methods", metavar="A,B,...", help="peers: only these methods (default all: linear, full, "
                   "vpt-shallow, vpt-deep, gated, lora, adaptformer, bitfit, ssf, spt, vipamin, vfpt, e2vpt, da-vpt, da-vpt+)")
    r.add_argument("--out", help="output folder (default runs/reproduce/TABLE)")
    r.add_argument("--seeds", type=int, default=1, help="final runs per cell: seeds 42..42+N-1 (default 1, "
                                                         "the paper's single seed)")
    r.add_argument("--dry-run", action="store_true",
                   help="print the datasets and weights needed (and whether they are there), the runs, their epochs "
                        "and work (images processed, FLOPs); train nothing")
    r.add_argument("--time-per-image", type=float, default=None, metavar="SECONDS",
                   help="--dry-run: also estimate the wall time, at SECONDS per reference image (ViT-B/16 224 px, "
                        "100 prompts, one training forward + backward; e.g. 1 / images_per_s of benchmarks/gpu.py's "
                        "train_step gated+temperature cell); other cells are scaled by their FLOPs")
    r.add_argument("--json", action="store_true", help="--dry-run (and table5): print JSON")
    r.add_argument("--render-only", action="store_true", help="write the table from the runs already finished")
    r.add_argument("--workers", type=int, default=None,
                   help="runs at once: default one per GPU, else 1; 0 runs inline in this process")
    r.add_argument("--backend", default="local", choices=["local", "ray"], help="local worker processes or Ray Tune")
    r.add_argument("--ray-address", default=None, help="'auto' joins a running Ray cluster")
    r.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    r.add_argument("--preload", action="append", default=[], metavar="MODULE|FILE.py",
                   help="import this in every worker first (e.g. a module registering a custom backbone)")
    r.set_defaults(func=_main_wrapper)
