"""Every method at micro scale: the demo's MAE-pretrained micro ViT on the procedural `count` task.

    python scripts/micro_methods.py --out runs/micro_methods          # about 10 min on 2 CPU cores
    python scripts/micro_methods.py --methods lora,ssf --tasks count   # a subset

One rule for every method, fixed before any number was seen: the demo's budget (1000 training
images, 8 epochs, 1 warm-up, cosine, batch 32, 8 prompts where a method has prompts), each method
with its own optimizer family (SGD for the VPT-codebase methods, AdamW where the authors' VTAB
code uses it: LoRA, SSF, AdaptFormer, DA-VPT), three learning rates per family, the lr chosen on
the held-out val (250 images) at the last epoch, and test top-1 (500 images) of the last epoch
reported, as VPT / GaPT / VIPAMIN / VFPT / E2VPT report it. The runs go side by side in the demo's
single-threaded workers; every run is an ordinary run folder, so an interrupted call continues.

Writes ``micro_methods.json`` and ``micro_methods.md`` (the README's table) under --out. What
this shows: each method trains end to end through the CLI's code path and how they rank on a
6-block, 64-wide ViT after 256 SGD steps; it says nothing about their ranking on ViT-B/16.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gapt.config import DataConfig, RunConfig, TrainConfig, validate  # noqa: E402
from gapt.demo.run import ASSET, BATCH, EPOCHS, NUM_TRAIN  # noqa: E402

SGD_LRS = (0.05, 0.2, 0.8)          # the demo's grid
ADAMW_LRS = (1e-3, 3e-3, 1e-2)      # around the AdamW recipes' lrs (LoRA 1e-3, SSF 1e-3..5e-2, DA-VPT 1e-4..1e-2)
# label -> (method, extra settings, optimizer)
METHODS: Dict[str, Tuple[str, Dict, str]] = {
    "linear": ("linear", {}, "sgd"),
    "vpt-shallow": ("vpt-shallow", {}, "sgd"),
    "vpt-deep": ("vpt-deep", {}, "sgd"),
    "gated+temperature": ("gated", {"learn_temperature": True, "gate_init": 5.0}, "sgd"),
    "spt (vpt-deep)": ("vpt-deep", {"prompt_init": "spt"}, "sgd"),
    "vipamin (vpt-shallow)": ("vpt-shallow", {"prompt_init": "vipamin"}, "sgd"),
    "vfpt": ("vfpt", {}, "sgd"),
    "e2vpt": ("e2vpt", {}, "sgd"),
    "da-vpt": ("da-vpt", {}, "adamw"),
    "lora": ("lora", {}, "adamw"),
    "adaptformer": ("adaptformer", {}, "adamw"),
    "bitfit": ("bitfit", {}, "sgd"),
    "ssf": ("ssf", {}, "adamw"),
}
PROMPTS = 8


def config(task: str, label: str, lr: float, out: Path, quick: bool) -> RunConfig:
    method, extra, optimizer = METHODS[label]
    epochs, num_train, warmup = (2, 64, 0) if quick else (EPOCHS, NUM_TRAIN, 1)
    cfg = RunConfig(backbone="mae_vit_micro", weights=str(ASSET), method=method, num_prompts=PROMPTS,
                    image_size=32, prompt_dropout=0.0,
                    data=DataConfig(format="shapes", name=task, num_samples=num_train, num_workers=0),
                    train=TrainConfig(epochs=epochs, warmup_epochs=warmup, batch_size=BATCH, lr=lr, seed=0,
                                      optimizer=optimizer, weight_decay=0.0),
                    out=str(out), device="cpu")
    for key, value in extra.items():
        setattr(cfg, key, value)
    validate(cfg)
    return cfg


def run_one(cfg: RunConfig) -> Dict:
    """Train ``cfg`` to its end (or reuse its results); the last epoch's val and test top-1 from metrics.jsonl.
    A run that fails returns its error (recorded in the table), so the other methods still run."""
    try:
        return _run_one(cfg)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


def _run_one(cfg: RunConfig) -> Dict:
    from gapt.engine import runfolder as rf
    from gapt.engine.trainer import train
    folder = Path(cfg.out)
    if not (folder / rf.RESULTS).exists():
        train(cfg, resume=(folder / rf.RESUME).exists())
    results = rf.read_json(folder / rf.RESULTS)
    last = [m for m in rf.read_metrics(folder) if "val_top1" in m][-1]
    test = results["metrics"].get("test_top1_last", results["metrics"].get("test_top1"))
    return {"lr": cfg.train.lr, "val_top1_last": last["val_top1"], "test_top1_last": test,
            "tuned_params": results.get("tuned_params"), "epochs": last["epoch"]}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/micro_methods")
    p.add_argument("--tasks", default="count")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--workers", type=int, default=0, help="as `gapt demo --workers` (0: one per core)")
    p.add_argument("--quick", action="store_true", help="64 images, 2 epochs (a smoke run)")
    args = p.parse_args(argv)
    from gapt.demo.workers import RunPool, default_workers
    out, start = Path(args.out), time.time()
    tasks, labels = args.tasks.split(","), [m for m in args.methods.split(",") if m]
    unknown = [m for m in labels if m not in METHODS]
    if unknown:
        p.error(f"unknown method label(s) {unknown}; choose from {list(METHODS)}")
    runs, errors = {}, {}
    with RunPool(args.workers or default_workers()) as pool:
        for task in tasks:
            for label in labels:
                lrs = ADAMW_LRS if METHODS[label][2] == "adamw" else SGD_LRS
                for lr in lrs:
                    folder = out / task / label.replace(" ", "_") / f"lr_{lr:g}"
                    try:
                        pool.submit((task, label, lr), run_one, config(task, label, lr, folder, args.quick))
                    except Exception as e:  # noqa: BLE001 - a method this checkout cannot build: recorded
                        errors[(task, label)] = f"{type(e).__name__}: {e}"
        while pool.pending:
            key, value = pool.next()
            if "error" in value:
                errors[key[:2]] = value["error"]
            else:
                runs.setdefault(key[:2], []).append(value)
    table = []
    for task in tasks:
        for label in labels:
            got = runs.get((task, label), [])
            if not got or (task, label) in errors:
                table.append({"task": task, "method": label, "error": errors.get((task, label), "no run")})
                continue
            best = max(got, key=lambda r: (r["val_top1_last"], -r["lr"]))  # ties: the smaller lr
            n = 500 if not args.quick else 50
            se = math.sqrt(best["test_top1_last"] * (100 - best["test_top1_last"]) / n)
            table.append({"task": task, "method": label, "optimizer": METHODS[label][2], **best, "test_se": se,
                          "all_lrs": sorted(got, key=lambda r: r["lr"])})
    (out / "micro_methods.json").write_text(json.dumps({"rule": __doc__, "rows": table,
                                                        "wall_s": time.time() - start}, indent=2))
    lines = ["| task | method | optimizer | chosen lr | val top-1 (last) | test top-1 (last) | tuned params |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in table:
        if "error" in r:
            lines.append(f"| {r['task']} | {r['method']} | — | — | — | {r['error'][:60]} | — |")
        else:
            lines.append(f"| {r['task']} | {r['method']} | {r['optimizer']} | {r['lr']:g} | {r['val_top1_last']:.1f} | "
                         f"{r['test_top1_last']:.1f} ± {r['test_se']:.1f} | {r['tuned_params'] or '—'} |")
    (out / "micro_methods.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\n{time.time() - start:.0f} s; wrote {out / 'micro_methods.md'} and .json", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
