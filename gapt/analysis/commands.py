"""``gapt analyze gates | attention | insertion | ...`` (one module of gapt.analysis per figure family)."""
from __future__ import annotations

import re
import sys
from typing import List

EPILOG = "Config keys for insertion: KEY=VALUE overrides as for `gapt train` (see `gapt keys`)."

def cmd_gates(args) -> int:
    from .gates import analyze_gates
    res = analyze_gates(args.runs, args.out)
    print(res["table"], end="")
    extra = f", {res['png_tasks']}" if res.get("png_tasks") else ""
    print(f"\nwrote {res['png']}{extra}, {res['md']} and {res['json']}", file=sys.stderr)
    return 0

def cmd_attention(args) -> int:
    from .attention import analyze_attention_images
    blocks = parse_blocks(args.blocks) if args.blocks else None
    results = analyze_attention_images(args.paths, args.out, args.head, device=args.device, blocks=blocks)
    for res in results:
        s = res["summary"]
        print(f"{s['image']} (head {s['head']})")
        print(f"{'model':<40} {'block':>5}  {'CLS->patches':>12}  {'CLS->prompts':>12}")
        for row in s["rows"]:
            for b, p, q in zip(s["blocks"], row["cls_to_patches"], row["cls_to_prompts"]):
                print(f"{row['label'][:40]:<40} {b:>5}  {p:12.4f}  {q:12.4f}")
        print(f"wrote {res['png']}, {res['npz']}, {res['json']} and {res['md']}", file=sys.stderr)
    return 0

def _backbone_specs(args):
    """--backbone B [--weights F] [--lr X] ... : the i-th --weights / --lr belong to the i-th --backbone."""
    names = args.backbone or []
    for flag in ("weights", "lr"):
        given = getattr(args, flag) or []
        if given and len(given) != len(names):
            raise ValueError(f"--{flag} given {len(given)} time(s) for {len(names)} --backbone(s); give one per "
                             f"backbone (or none, to use the config's)")
    return [{"backbone": b, "weights": (args.weights or [None] * len(names))[i],
             "lr": (args.lr or [None] * len(names))[i]} for i, b in enumerate(names)]

def cmd_insertion(args) -> int:
    from ..config import load_config
    from ..sweep.executors import make_executor
    from .insertion import insertion_sweep
    cfg = load_config(args.config, args.overrides)
    blocks = parse_blocks(args.blocks) if args.blocks else None
    backbones = _backbone_specs(args)
    workers = args.workers if args.workers is not None else (0 if args.backend == "local" else None)
    executor = make_executor(args.backend, workers, use_gpus=cfg.device != "cpu")
    res = insertion_sweep(cfg, blocks, executor=executor, backbones=backbones)
    print(res.get("table", ""), end="")
    print(f"\nwrote {cfg.out}/insertion.png, insertion.json and insertion.md", file=sys.stderr)
    failed = [r for c in res["curves"] for r in c["runs"] if r["status"].startswith("failed")]
    return 1 if failed else 0

def cmd_reconstruct(args) -> int:
    from ..sweep.executors import make_executor
    from .reconstruct import reconstruct
    backbones = _backbone_specs(args)
    if not backbones:
        raise ValueError("give at least one --backbone (with its --weights), e.g. --backbone mae_vitb16 "
                         "--weights mae_pretrain_vit_base.pth")
    blocks = parse_blocks(args.blocks) if args.blocks else None
    options = {k: v for k, v in dict(steps=args.steps, lr=args.dip_lr, image_size=args.image_size, seed=args.seed,
                                     scales=args.dip_scales, channels=args.dip_channels, device=args.device).items()
               if v is not None}
    workers = args.workers if args.workers is not None else (0 if args.backend == "local" else None)
    executor = make_executor(args.backend, workers, use_gpus=args.device != "cpu")
    res = reconstruct(args.images, backbones, blocks, args.out, executor=executor, **options)
    from .reconstruct import reconstruct_table
    print(reconstruct_table(res["rows"], res["means"], res["failed"]), end="")
    print(f"\nwrote {args.out}/reconstruct.json, reconstruct.md, reconstruct_metrics.png and "
          f"{len(res['png']) - 1 if res['png'] else 0} grid(s)", file=sys.stderr)
    return 1 if res["failed"] else 0

def cmd_ablation(args) -> int:
    from .ablation import analyze_ablation
    res = analyze_ablation(args.runs, args.out, include_trials=args.include_trials)
    print(res["table"], end="")
    print(f"\nwrote {res.get('png', '')} {res['png_tasks']}, {res['md']} and {res['json']}", file=sys.stderr)
    return 0

def cmd_tokens(args) -> int:
    from .tokens import analyze_tokens
    res = analyze_tokens(args.runs, args.task, args.out, backbone=args.backbone, include_trials=args.include_trials)
    print(res["table"], end="")
    print(f"\nwrote {res['png']}, {res['md']} and {res['json']}", file=sys.stderr)
    return 0

def _head(value: str):
    if value == "mean":
        return value
    try:
        return int(value)
    except ValueError:
        import argparse
        raise argparse.ArgumentTypeError(f"--head takes 'mean' or a head index, got {value!r}") from None

def add_commands(subparsers) -> None:
    a = subparsers.add_parser("analyze", help="the paper's figures from runs: gates, attention, insertion, reconstruct, ablation, tokens")
    sub = a.add_subparsers(dest="analysis", metavar="ANALYSIS")
    a.set_defaults(func=lambda args: (a.print_help(), 2)[1])

    g = sub.add_parser("gates", help="gates, selection ratio r_l and temperatures per block (table + PNG; Fig. 4)",
                       description="Gates, selection ratios and temperatures per block of each run (gates.png/.md/"
                                   ".json); runs of several tasks or backbones also get gates_tasks.png, a panel "
                                   "per task with a bar per backbone (the paper's Fig. 4).")
    g.add_argument("runs", nargs="+", metavar="RUN", help="finished run folders (shown side by side)")
    g.add_argument("--out", help="output folder (default: RUN/analysis for one run, ./analysis for several)")
    g.set_defaults(func=cmd_gates)

    t = sub.add_parser("attention", help="attention maps per block: frozen backbone, then each run (Fig. 5)",
                       description="One figure per image: a row per model (the frozen backbone first, then each "
                                   "RUN's CLS attention; a single prompt run also shows its prompts' mean map) and a "
                                   "column per block. IMAGE may be a folder (every image under it).")
    t.add_argument("paths", nargs="+", metavar="RUN... IMAGE",
                   help="run folders, then image files or folders of images")
    t.add_argument("--blocks", help="blocks to show, e.g. 3,7,12 (default: every block)")
    t.add_argument("--out", help="output folder (default: first RUN/analysis)")
    t.add_argument("--head", type=_head, default="mean", help="'mean' over heads (default) or a head index")
    t.add_argument("--device", help="e.g. cpu or cuda (default: the run's device setting)")
    t.set_defaults(func=cmd_attention)

    s = sub.add_parser("insertion", help="train vpt-at-block k for k = 1..L and plot top-1 against k (Fig. 1)",
                       epilog=EPILOG,
                       description="One vpt@k run per block k (and per --backbone, each with its own --weights "
                                   "and --lr), run through the sweep executors; finished runs are skipped, "
                                   "interrupted ones resumed. Example (Fig. 1): --backbone mae_vitb16 --weights "
                                   "mae.pth --lr 0.1 --backbone mocov3_vitb16 --weights moco.pth --lr 1.0")
    s.add_argument("--config", help="YAML config file")
    s.add_argument("--blocks", help="insertion blocks, e.g. 1,2,5 or 1-6 (default: every block)")
    s.add_argument("--backbone", action="append", help="a backbone to sweep (repeatable; default: the config's)")
    s.add_argument("--weights", action="append", help="weights file of the matching --backbone (repeatable)")
    s.add_argument("--lr", action="append", type=float, help="train.lr of the matching --backbone (repeatable)")
    s.add_argument("--workers", type=int, help="parallel runs (default: one at a time in this process)")
    s.add_argument("--backend", choices=["local", "ray"], default="local", help="local processes (default) or ray")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    s.set_defaults(func=cmd_insertion)

    r = sub.add_parser("reconstruct", help="Deep Image Prior reconstructions from each block's tokens (Figs. 2, 9-11)",
                       description="Reconstructs each image from the tokens leaving each block of each backbone "
                                   "with Deep Image Prior (SPEC §10): one job per image x block x backbone, run "
                                   "through the sweep executors (finished jobs skipped, interrupted ones resumed). "
                                   "Writes a grid per image, every reconstruction as PNG, reconstruct.json/.md "
                                   "(PSNR, SSIM) and reconstruct_metrics.png (Fig. 9).")
    r.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    r.add_argument("--backbone", action="append", help="a backbone (repeatable: one grid row / plot line each)")
    r.add_argument("--weights", action="append", help="weights file of the matching --backbone (repeatable)")
    r.add_argument("--blocks", help="blocks to reconstruct from, e.g. 1-12 or 3,7,12 (default: every block)")
    r.add_argument("--steps", type=int, help="DIP steps per job (default 2000)")
    r.add_argument("--dip-lr", type=float, help="Adam learning rate of the generator (default 0.01)")
    r.add_argument("--image-size", type=int, help="square input size (default 224)")
    r.add_argument("--seed", type=int, help="seed of the generator, its noise input and the per-step noise (default 0)")
    r.add_argument("--dip-scales", type=int, help="generator scales (default 5; fewer for quick checks)")
    r.add_argument("--dip-channels", type=int, help="generator channels (default 128; fewer for quick checks)")
    r.add_argument("--out", default="reconstruct", help="output folder (default ./reconstruct)")
    r.add_argument("--workers", type=int, help="parallel jobs (default: one at a time in this process; "
                                               "worker processes take one GPU each)")
    r.add_argument("--backend", choices=["local", "ray"], default="local", help="local processes (default) or ray")
    r.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    r.set_defaults(func=cmd_reconstruct, lr=None)

    b = sub.add_parser("ablation", help="VPT-shallow -> + GATE -> + GATE + LT bars per backbone (Figs. 6, 8)",
                       description="Bars per backbone for VPT-shallow (method=vpt-shallow), + GATE (method=gated) "
                                   "and + GATE + LT (method=gated learn_temperature=true), on the benchmark means "
                                   "(ablation.png: FGVC mean, VTAB-1k mean, ADE20K mIoU) and per dataset "
                                   "(ablation_tasks.png), the paper's numbers marked where it prints them.")
    b.add_argument("runs", nargs="+", metavar="RUNS", help="run folders or folders holding them (searched recursively)")
    b.add_argument("--out", help="output folder (default ./analysis)")
    b.add_argument("--include-trials", action="store_true", help="also use sweep trials (folders under trials/)")
    b.set_defaults(func=cmd_ablation)

    k = sub.add_parser("tokens", help="top-1 against the total number of prompts, VPT-deep vs gated (Fig. 7)",
                       description="Top-1 against the total number of prompts (VPT-deep: blocks x prompts per "
                                   "block) for VPT-deep and gated runs of one task, with Table 7's points and, for "
                                   "cars, the paper text's two points beside them.")
    k.add_argument("runs", nargs="+", metavar="RUNS", help="run folders or folders holding them (searched recursively)")
    k.add_argument("--task", required=True, help="the task to plot, e.g. cars (as in results.json)")
    k.add_argument("--backbone", help="only runs of this backbone (default: every backbone found)")
    k.add_argument("--out", help="output folder (default ./analysis)")
    k.add_argument("--include-trials", action="store_true", help="also use sweep trials (folders under trials/)")
    k.set_defaults(func=cmd_tokens)

def parse_blocks(text: str) -> List[int]:
    """``"1,2,5"`` or ``"1-4,6"`` -> sorted distinct block numbers."""
    blocks = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        try:
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if lo > hi:
                    raise ValueError
                blocks.update(range(lo, hi + 1))
            else:
                blocks.add(int(part))
        except ValueError:
            raise ValueError(f"--blocks: cannot read {part!r}; give block numbers like 1,2,5 or 1-4") from None
    if not blocks:
        raise ValueError("--blocks: no block numbers given")
    return sorted(blocks)
