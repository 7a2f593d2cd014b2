#!/usr/bin/env python
"""How good is the demo's lr rule? Run every lr of a finished demo to the end and compare.

    gapt demo --out runs/demo && cp -r runs/demo runs/demo_all_lrs
    python scripts/check_demo_lr_rule.py runs/demo_all_lrs

The demo (gapt/demo/run.py) runs each lr of its grid to the rung, then only the best one on.
This script continues the others in the folder it is given (so work on a copy: the demo itself
never trains them), each from its own resume file, i.e. exactly the full-length run it would have
been, then prints per task and method: the lr the rule chose, the lr that the same rule applied
after each later epoch would choose (val top-1, ties lower val loss then smaller lr), the lr with
the best val top-1 over the whole run (ties: smaller lr), and every lr's test top-1 at its best-val epoch.
The test numbers are for reading only; nothing here chooses by test.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gapt.config import load_config  # noqa: E402
from gapt.demo.run import LR_GRID, _advance, choose_lr, lr_folder  # noqa: E402
from gapt.demo.workers import RunPool, default_workers  # noqa: E402
from gapt.engine import runfolder as rf  # noqa: E402


def tunings(root: Path):
    """Folders that hold one run per lr of the grid (the demo's methods and vpt@k points)."""
    return sorted(p for p in root.rglob("*") if p.is_dir() and all((p / lr_folder(lr) / rf.CONFIG).exists()
                                                                    for lr in LR_GRID))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demo_copy", type=Path, help="a copy of a finished demo's --out folder (it is trained further)")
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args(argv)
    found = tunings(args.demo_copy)
    if not found:
        sys.exit(f"no demo runs under {args.demo_copy}")
    with RunPool(args.workers or default_workers()) as pool:
        for t in found:
            for lr in LR_GRID:
                folder = t / lr_folder(lr)
                cfg = load_config(str(folder / rf.CONFIG), overrides=[f"out={folder}"], saved=True)
                pool.submit((t, lr), _advance, cfg)
        while pool.pending:
            (t, lr), res = pool.next()
            print(f"{t.relative_to(args.demo_copy)} lr {lr:g}: test top-1 {res['metrics']['test_top1']:.1f}",
                  file=sys.stderr, flush=True)
    epochs = len(rf.read_metrics(found[0] / lr_folder(LR_GRID[0])))
    rung = rf.read_json(args.demo_copy / "demo.json")["rules"]["rung_epochs"]
    print(f"| tuning | the rule's choice after epoch {rung} (the demo's), {rung + 1}, ..., {epochs} | "
          "best val over the run | test top-1 per lr (best-val epoch) |")
    print("|---|---|---|---|")
    for t in found:
        metrics = {lr: rf.read_metrics(t / lr_folder(lr)) for lr in LR_GRID}
        after = [choose_lr({lr: metrics[lr][e - 1] for lr in LR_GRID}) for e in range(rung, epochs + 1)]
        best = min(LR_GRID, key=lambda lr: (-max(r["val_top1"] for r in metrics[lr]), lr))
        tests = {lr: rf.read_json(t / lr_folder(lr) / rf.RESULTS)["metrics"]["test_top1"] for lr in LR_GRID}
        print(f"| {t.relative_to(args.demo_copy)} | {', '.join(f'{x:g}' for x in after)} | {best:g} | "
              + ", ".join(f"{lr:g}: {tests[lr]:.1f}" for lr in LR_GRID) + " |")


if __name__ == "__main__":
    main()
