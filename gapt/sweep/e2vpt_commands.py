"""`gapt e2vpt-prune RUN`: E2VPT's pruning and rewinding after a method=e2vpt run (gapt/sweep/e2vpt_prune.py)."""
from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
E2VPT's pruning and rewinding (SPEC §12.4(d)), as its official tune_vtab_PruningRewind_CVK.py runs them, after
the lr x wd search (gapt sweep --config vtab/mae_vitb16/e2vpt/dtd --grid e2vpt ...):

  1. importance: one pass over RUN's training split at its last epoch's state; the signed mean gradient of the
     loss w.r.t. the token mask and the piece mask (the optimizer steps as the official pass does);
  2. masks: per token count (10..90 % of the prompts, at least one kept) the lowest-scored tokens; per piece count
     (10..90 % of 16, at least 4 kept) each token's lowest-scored pieces (strided: piece j = dims j, j+16, ...);
  3. rewind: a freshly initialised run per (token count, piece count), those masks fixed and frozen;
  4. the best val top-1 at the last epoch (ties: more masked tokens);
  5. final runs on the final split with --seeds.

  gapt e2vpt-prune runs/vtab/dtd-mae_vitb16-e2vpt              # a sweep folder (its chosen trial) or a run
  gapt e2vpt-prune RUN --workers 4 --seeds 42,44 --dry-run

Outputs under --out (default RUN/prune, or SWEEP/prune): importance/, masks.json (and the official mask_tokens*/ files),
trials/t<n>_p<m>/ (the rewinds), final/seed<S>/, prune.json. Rerunning the same command continues where it stopped."""


def _seeds(text: str):
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from None


def cmd_e2vpt_prune(args) -> int:
    from .e2vpt_prune import print_summary, run_prune
    from .jobs import SweepError
    try:
        state = run_prune(args.run, args.out, seeds=args.seeds, rewind_seed=args.rewind_seed, reverse=args.reverse,
                          backend=args.backend, workers=args.workers, preload=args.preload,
                          retry_failed=args.retry_failed, dry_run=args.dry_run)
    except SweepError as e:
        print(f"gapt e2vpt-prune: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(state, indent=2))
    elif args.dry_run:
        print(f"pruning {state['run']} -> {state['out']}: importance {state['importance']}, "
              f"{len(state['rewinds'])} rewound run(s) (token counts {state['token_counts']}, piece counts "
              f"{state['piece_counts']}), rewind seed {state['rewind_seed']}")
        for r in state["rewinds"]:
            print(f"  {r['name']:10s} {r['status']}")
    else:
        print_summary(state)
    return 0 if state["status"] in ("done", "dry_run") else 1


def add_commands(subparsers) -> None:
    """Add `gapt e2vpt-prune` to the gapt command line (see gapt.cli.COMMAND_MODULES)."""
    p = subparsers.add_parser("e2vpt-prune", help="E2VPT's pruning and rewinding after a method=e2vpt run: "
                              "importance, a rewound run per mask pair, the best on val, final runs",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a finished method=e2vpt run folder (e2vpt_masks=learned), or a finished gapt sweep "
                               "folder (its chosen trial)")
    p.add_argument("--out", default=None,
                   help="folder for the pipeline (default RUN/prune; for a sweep folder SWEEP/prune)")
    p.add_argument("--seeds", type=_seeds, default=[42, 44, 82, 100, 800],
                   help="final runs' seeds, comma-separated (default E2VPT's 42,44,82,100,800; empty: no finals)")
    p.add_argument("--rewind-seed", type=int, default=None,
                   help="seed of the rewound runs (default: the run's seed + 1, a fresh initialisation as the "
                        "official unseeded rewind; the run's own seed redraws its initial prompts)")
    p.add_argument("--reverse", action="store_true",
                   help="mask the highest-scored tokens / pieces first (E2VPT's MASK_RESERVE=True; default: lowest "
                        "first, the released setting)")
    p.add_argument("--workers", type=int, default=None,
                   help="runs at once: default one per GPU, else 1; 0 runs inline in this process")
    p.add_argument("--backend", default="local", choices=["local", "ray"], help="local worker processes, or Ray")
    p.add_argument("--preload", action="append", default=[], metavar="MODULE|FILE.py",
                   help="import this in every worker first (e.g. a module registering a custom backbone)")
    p.add_argument("--retry-failed", action="store_true", help="run failed jobs again")
    p.add_argument("--dry-run", action="store_true", help="list the jobs and their state, run nothing")
    p.add_argument("--json", action="store_true", help="print prune.json's content (or the dry run) as JSON")
    p.set_defaults(func=cmd_e2vpt_prune)
