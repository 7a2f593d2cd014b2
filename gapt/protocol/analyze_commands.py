"""``gapt analyze gates | attention | insertion`` (see :mod:`gapt.protocol.analyze`)."""
from __future__ import annotations

import sys

EPILOG = "Config keys for insertion: KEY=VALUE overrides as for `gapt train` (see `gapt keys`)."


def cmd_gates(args) -> int:
    from .analyze import analyze_gates
    res = analyze_gates(args.runs, args.out)
    print(res["table"], end="")
    print(f"\nwrote {res['png']}, {res['md']} and {res['json']}", file=sys.stderr)
    return 0


def cmd_attention(args) -> int:
    from .analyze import analyze_attention
    res = analyze_attention(args.run, args.image, args.out, args.head, device=args.device)
    a = res["arrays"]
    print(f"{'block':>5}  {'CLS->patches':>12}  {'CLS->prompts':>12}  {'frozen CLS->patches':>19}")
    for b in range(a["tuned_cls"].shape[0]):
        print(f"{b + 1:>5}  {a['tuned_cls'][b].sum():12.4f}  {a['tuned_cls_to_prompts'][b]:12.4f}  "
              f"{a['frozen_cls'][b].sum():19.4f}")
    print(f"\nwrote {res['png']} and {res['npz']}", file=sys.stderr)
    return 0


def cmd_insertion(args) -> int:
    from ..config import load_config
    from .analyze import insertion_sweep, parse_blocks
    cfg = load_config(args.config, args.overrides)
    blocks = parse_blocks(args.blocks) if args.blocks else None
    res = insertion_sweep(cfg, blocks)
    print(res.get("table", ""), end="")
    print(f"\nwrote {cfg.out}/insertion.png, insertion.json and insertion.md", file=sys.stderr)
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
    a = subparsers.add_parser("analyze", help="gates / attention maps / insertion-location sweep")
    sub = a.add_subparsers(dest="analysis", metavar="ANALYSIS")
    a.set_defaults(func=lambda args: (a.print_help(), 2)[1])

    g = sub.add_parser("gates", help="gates, selection ratio r_l and temperatures per block (table + PNG)")
    g.add_argument("runs", nargs="+", metavar="RUN", help="finished run folders (shown side by side)")
    g.add_argument("--out", help="output folder (default: RUN/analysis for one run, ./analysis for several)")
    g.set_defaults(func=cmd_gates)

    t = sub.add_parser("attention", help="per-block attention maps from CLS and prompts, tuned vs frozen (PNG + npz)")
    t.add_argument("run", metavar="RUN")
    t.add_argument("image", metavar="IMAGE")
    t.add_argument("--out", help="output folder (default: RUN/analysis)")
    t.add_argument("--head", type=_head, default="mean", help="'mean' over heads (default) or a head index")
    t.add_argument("--device", help="e.g. cpu or cuda (default: the run's device setting)")
    t.set_defaults(func=cmd_attention)

    s = sub.add_parser("insertion", help="train vpt-at-block k for k = 1..L and plot top-1 against k",
                       epilog=EPILOG)
    s.add_argument("--config", help="YAML config file")
    s.add_argument("--blocks", help="insertion blocks, e.g. 1,2,5 or 1-6 (default: every block)")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    s.set_defaults(func=cmd_insertion)
