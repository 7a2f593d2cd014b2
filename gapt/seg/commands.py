"""`gapt seg train | eval | predict`: semantic segmentation with a prompted frozen ViT."""
from __future__ import annotations

import json
import sys

SEG_EPILOG = ("Config keys: KEY=VALUE overrides, e.g. data.root=/data/ADEChallengeData2016 seg.iterations=80000; "
              "see `gapt keys`. Presets: --config ade20k/mae_vitb16 or ade20k/mocov3_vitb16. Without --config "
              "the SETR-PUP ADE20K recipe is the default: data.format=ade20k, seg.iterations=160000, "
              "seg.eval_every=16000, train.batch_size=16, train.lr=0.001.")
# What `gapt seg train` starts from, under the YAML file and the overrides: the classification
# defaults (data.format=folder, no iterations) would stop a plain `gapt seg train data.root=...`.
SEG_DEFAULTS = {"data": {"format": "ade20k"},
                "seg": {"iterations": 160000, "eval_every": 16000}, "train": {"batch_size": 16, "lr": 0.001}}


def cmd_seg_train(args) -> int:
    from ..cli_support import finished_and_not_forced, resume_hint_on_interrupt
    from ..config import load_config
    from ..engine.run import config_for_resume
    from .train import train_seg
    kw = dict(multi_scale=args.multi_scale, log_every=args.log_every, save_every=args.save_every,
              stop_after=args.stop_after)
    if args.resume:
        if args.config or args.overrides:
            raise SystemExit("gapt seg train: --resume continues a run with its saved config.yaml; "
                             "drop --config and KEY=VALUE overrides")
        cfg = config_for_resume(args.resume)
        if finished_and_not_forced(args, "gapt seg train"):
            return 0
        with resume_hint_on_interrupt(args.resume, "gapt seg train"):
            results = train_seg(cfg, resume=True, **kw)
    else:
        cfg = load_config(args.config, args.overrides, base=SEG_DEFAULTS)
        with resume_hint_on_interrupt(cfg.out, "gapt seg train"):
            results = train_seg(cfg, **kw)
    from ..engine.distributed import is_main
    if not is_main():
        return 0
    if "metrics" in results:
        m = results["metrics"]
        ms = f", multi-scale mIoU {m['mIoU_ms']:.2f}" if m.get("mIoU_ms") is not None else ""
        miou = f"{m['mIoU']:.2f}" if m.get("mIoU") is not None else "n/a"
        print(f"val mIoU {miou}{ms}")
    else:
        print(f"stopped after iteration {results['stopped_after']}; continue with `gapt seg train --resume`")
    return 0


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def cmd_seg_eval(args) -> int:
    from .evaluate import eval_run
    from ..engine.distributed import is_main
    from ..cli_support import run_overrides
    out = eval_run(args.run, args.split, multi_scale=args.multi_scale, overrides=run_overrides(args))
    if not is_main():
        return 0
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{args.run} {out['split']} ({out['images']} images): mIoU {_fmt(out['mIoU'])}  mAcc {_fmt(out['mAcc'])}  "
          f"aAcc {_fmt(out['aAcc'])}")
    if "mIoU_ms" in out:
        print(f"  multi-scale + flip: mIoU {_fmt(out['mIoU_ms'])}  mAcc {_fmt(out['mAcc_ms'])}  "
              f"aAcc {_fmt(out['aAcc_ms'])}")
    if args.per_class:
        for row in out["per_class"]:
            print(f"  {row['class']:24s} IoU {_fmt(row['iou']):>6s}  Acc {_fmt(row['acc']):>6s}")
    return 0


def cmd_seg_predict(args) -> int:
    from .evaluate import predict_run
    from ..cli_support import run_overrides
    preds = predict_run(args.run, args.images, args.out, multi_scale=args.multi_scale, alpha=args.alpha,
                        overrides=run_overrides(args))
    if args.json:
        print(json.dumps(preds, indent=2))
        return 0
    for p in preds:
        top = ", ".join(f"{c['class']} {c['share']:.0%}" for c in p["classes"][:5])
        print(f"{p['image']} -> {p['mask']}, {p['overlay']}  ({top})")
    return 0


def add_commands(subparsers) -> None:
    """Add `gapt seg ...` to the gapt command line (see gapt.cli.COMMAND_MODULES)."""
    from ..cli_support import add_resume_args, add_run_override_args
    seg = subparsers.add_parser("seg", help="semantic segmentation (ADE20K, SETR-PUP heads): train, eval, predict",
                                epilog=SEG_EPILOG)
    sub = seg.add_subparsers(dest="seg_command", metavar="SEG_COMMAND")
    seg.set_defaults(func=lambda args: (seg.print_help(), 2)[1])

    t = sub.add_parser("train", help="train prompts/gates/temperatures + SETR-PUP heads (iteration-based)",
                       epilog=SEG_EPILOG)
    t.add_argument("--config", help="YAML config file, or a packaged preset by name (e.g. ade20k/mae_vitb16)")
    add_resume_args(t)
    t.add_argument("--multi-scale", action="store_true", help="also evaluate multi-scale + flip at the end (mIoU_ms)")
    t.add_argument("--log-every", type=int, default=None, metavar="N",
                   help="iterations per metrics line, besides every evaluation (default 50; a resumed run "
                        "keeps its own)")
    t.add_argument("--save-every", type=int, default=None, metavar="N",
                   help="iterations per resume file, besides every evaluation and the end (default 1000)")
    t.add_argument("--stop-after", type=int, default=None, metavar="ITER",
                   help="save the resume state after iteration ITER and exit (continue with --resume)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    t.set_defaults(func=cmd_seg_train)

    e = sub.add_parser("eval", help="mIoU / mAcc / aAcc (+ per class) of a finished run; updates results.json")
    e.add_argument("run")
    e.add_argument("--split", default="val", choices=["val", "train"], help="the split to evaluate (default: val)")
    e.add_argument("--multi-scale", action="store_true",
                   help="also ratios 0.5-1.75 + flip, each resized from the original image (mIoU_ms)")
    e.add_argument("--per-class", action="store_true", help="print every class's IoU and accuracy")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    add_run_override_args(e)
    e.set_defaults(func=cmd_seg_eval)

    p = sub.add_parser("predict", help="colour-coded mask and overlay PNGs for images")
    p.add_argument("run")
    p.add_argument("images", nargs="+", help="image files, or folders (every image inside, recursively)")
    p.add_argument("--out", default=None, help="output folder (default RUN/predictions)")
    p.add_argument("--multi-scale", action="store_true", help="multi-scale + flip inference")
    p.add_argument("--alpha", type=float, default=0.5, help="mask opacity in the overlay (default 0.5)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_run_override_args(p, data_root=False)
    p.set_defaults(func=cmd_seg_predict)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `gapt seg ...`")
