"""`gapt` command line: parse a command + config, call one function of the layer below."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from typing import List, Optional

from .cli_support import (add_resume_args, add_run_override_args, finished_and_not_forced,
                          resume_hint_on_interrupt, run_overrides)

EPILOG = ("Config keys (train, sweep, seg train): KEY=VALUE overrides, e.g. train.lr=0.5 method=gated; see `gapt keys`. "
          "Curves: train.logger=auto (TensorBoard under RUN/tb/ when installed) | tensorboard | wandb | none.")
# A command that runs offline in about a minute on a CPU (generated images, a random micro ViT).
TRAIN_EXAMPLE = ("gapt train data.format=shapes data.name=count data.num_samples=200 backbone=mae_vit_micro "
                 "weights=null image_size=32 train.epochs=2 train.warmup_epochs=1 out=runs/try")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("gapt").setLevel(logging.DEBUG if verbose else logging.INFO)
    warnings.showwarning = _warning_to_log


def _warning_to_log(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings on the command line: one log line, without the source file and line."""
    logging.getLogger("gapt").warning("warning: %s", str(message).strip())


# -- commands -----------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from .config import load_config
    from .engine.run import config_for_resume
    from .engine.trainer import train
    if args.resume:
        if args.config or args.overrides:
            raise SystemExit("gapt train: --resume continues a run with its saved config.yaml; "
                             "drop --config and KEY=VALUE overrides")
        cfg = config_for_resume(args.resume)
        if finished_and_not_forced(args, "gapt train"):
            return 0
        with resume_hint_on_interrupt(args.resume, "gapt train"):
            train(cfg, resume=True)
        return 0
    cfg = load_config(args.config, args.overrides)
    with resume_hint_on_interrupt(cfg.out, "gapt train"):
        train(cfg)
    return 0


def cmd_eval(args) -> int:
    from .engine.inference import eval_run
    out = eval_run(args.run, args.split, run_overrides(args))
    print(json.dumps(out) if args.json else f"{args.run} {out['split']}: top-1 {out['top1']:.2f}% "
          f"({out['count']} images, loss {out['loss']:.4f})")
    return 0


def cmd_predict(args) -> int:
    from .engine.inference import predict
    preds = predict(args.run, args.images, args.top_k, args.batch_size, run_overrides(args), skip_bad=args.skip_bad)
    bad = [p for p in preds if "error" in p]
    if bad:
        print(f"gapt predict: skipped {len(bad)} unreadable image(s):", file=sys.stderr)
        for p in bad:
            print(f"  {p['image']}: {p['error']}", file=sys.stderr)
    if args.json:
        print(json.dumps(preds, indent=2))
        return 0
    for p in preds:
        if "error" in p:
            continue
        print(p["image"])
        for t in p["top"]:
            print(f"  {t['probability']:7.2%}  {t['class']}")
    return 0


def cmd_keys(args) -> int:
    from .config import CHOICES, RunConfig, all_keys, get_key, key_help
    defaults = RunConfig()
    for key in all_keys():
        text = key_help(key)
        if key in CHOICES and "|" not in text:  # the description does not list the choices itself
            text += f"{'; ' if text else ''}one of {CHOICES[key]}"
        print(f"{key} = {get_key(defaults, key)!r}" + (f"   # {text}" if text else ""))
    return 0


def cmd_presets(args) -> int:
    from .config import PRESETS_DIR, list_presets
    for name in list_presets():
        print(name)
    print(f"(files under {PRESETS_DIR}; e.g. gapt train --config {list_presets()[0]} data.root=...)", file=sys.stderr)
    return 0


def cmd_backbones(args) -> int:
    from .model.backbones import describe_backbones
    print(describe_backbones())
    return 0


def cmd_report(args) -> int:
    from .report.tables import write_report
    rep = write_report(args.runs, args.out, include_trials=args.include_trials and not args.only_final,
                       select=args.select)
    print(rep.markdown())
    print(f"\nwrote {args.out}/report.md and {args.out}/report.csv", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from .demo.run import run_demo
    run_demo(out=args.out, quick=args.quick, workers=args.workers)
    return 0


# -- parser -------------------------------------------------------------------------------------
class KeyValueParser(argparse.ArgumentParser):
    """Lets KEY=VALUE words follow options (`gapt train --config f a=1 --resume? b=2`).

    argparse fills a ``nargs="*"`` positional from one run of words only; later KEY=VALUE words
    come back unrecognised, and are appended here to the command's override list. Sub-commands
    are built with the parser's own class, so every level gets this.
    """
    KV_DESTS = ("overrides", "items")

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        late = [a for a in extras if "=" in a and not a.startswith("-")]
        dest = next((d for d in self.KV_DESTS if isinstance(getattr(ns, d, None), list)), None)
        if late and dest:
            setattr(ns, dest, getattr(ns, dest) + late)
            extras = [a for a in extras if a not in late]
        return ns, extras


def build_parser() -> argparse.ArgumentParser:
    p = KeyValueParser(prog="gapt", description="Gated prompt tuning for frozen self-supervised ViTs.",
                                epilog=EPILOG)
    from . import __version__
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"gapt {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train one run (YAML config + KEY=VALUE overrides)",
                       epilog=f"{EPILOG}\n\nexamples:\n  {TRAIN_EXAMPLE}\n  gapt train --config fgvc/mae_vitb16/cub "
                              f"data.root=/data/CUB_200_2011 weights=mae_pretrain_vit_base.pth",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", help="YAML config file, or a packaged preset by name (e.g. fgvc/mae_vitb16/cub; "
                                    "see `gapt presets`)")
    add_resume_args(t)
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="top-1 of a finished run on a split (best-val tuned state)")
    e.add_argument("run")
    e.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="the split to evaluate (default: test); only this split is read")
    e.add_argument("--json", action="store_true", help="print one JSON object (run, split, top1, loss, count)")
    add_run_override_args(e)
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="class probabilities for images with a finished run")
    pr.add_argument("run")
    pr.add_argument("images", nargs="+", help="image files, or folders (every image inside, recursively)")
    pr.add_argument("--top-k", type=int, default=5, help="classes listed per image, most probable first (default 5)")
    pr.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    pr.add_argument("--skip-bad", action="store_true",
                    help="skip images that cannot be read (listed with their errors) instead of stopping")
    add_run_override_args(pr, data_root=False)
    pr.set_defaults(func=cmd_predict)

    d = sub.add_parser("demo", help="the paper's story on a shipped MAE-pretrained micro ViT, offline, minutes on CPU")
    d.add_argument("--out", default="runs/demo", help="folder for the runs and the summary (default: runs/demo)")
    d.add_argument("--quick", action="store_true", help="a smaller, faster version (used by the tests)")
    d.add_argument("--workers", type=int, default=0,
                   help="runs at a time, each in its own single-threaded process (default: one per CPU core, "
                        "at most 8; 1 = one at a time in this process)")
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("report", help="tables per task and benchmark means beside the paper's numbers",
                       description="Rows pool only runs that differ in seed alone and show the settings they "
                                   "stand for; each sits beside the matching paper row (Tables 1-4, 6-8). "
                                   "Exits non-zero, writing nothing, when there are no runs.")
    r.add_argument("runs", nargs="+", help="run folders or folders holding them")
    r.add_argument("--out", default="reports", help="folder for report.md and report.csv (default: reports)")
    r.add_argument("--only-final", action="store_true", help="leave out sweep trials (the default)")
    r.add_argument("--include-trials", action="store_true",
                   help="also report sweep trials (runs in a sweep's trials/ folder), each in rows of their own "
                        "settings")
    r.add_argument("--select", choices=("last", "best-val"), default="last",
                   help="which epoch's test top-1 is ours: last (default; the paper's protocol, SPEC §6) or "
                        "best-val (the best held-out val epoch; runs without held-out val show their last); "
                        "the paper columns always compare with the last epoch")
    r.set_defaults(func=cmd_report)

    k = sub.add_parser("keys", help="list every config key with its default and what it means")
    k.set_defaults(func=cmd_keys)
    ps = sub.add_parser("presets", help="list the packaged presets (use one as --config NAME)")
    ps.set_defaults(func=cmd_presets)
    b = sub.add_parser("backbones", help="list the registered backbones: architecture, pooling, checkpoint "
                                         "layout, and the file to download (nothing is fetched)")
    b.set_defaults(func=cmd_backbones)

    import importlib
    for module in COMMAND_MODULES:  # each adds its own sub-commands
        importlib.import_module(module).add_commands(sub)
    return p


# Command groups that live beside the layer they drive. Each module defines add_commands(subparsers)
# and imports nothing heavy at its top: torch, timm, numpy, matplotlib and the modules that use
# them are imported inside the cmd_* functions, so `gapt --help`, `--version` and `keys` stay fast
# (tests/test_cli_help.py checks that neither torch nor timm gets imported). Errors a command
# defines for user mistakes go in USER_ERRORS below, by module and name.
COMMAND_MODULES: List[str] = ["gapt.analysis.commands", "gapt.seg.commands", "gapt.sweep.commands",
                              "gapt.paper.commands", "gapt.engine.export_commands", "gapt.sweep.e2vpt_commands"]


# Errors that are the user's to fix: printed in one line, no traceback. Those defined in heavy
# modules are looked up only if their module was imported (else they cannot have been raised).
USER_ERRORS = [("gapt.config", "ConfigError"), ("gapt.model.checkpoints", "CheckpointError"),
               ("gapt.engine.runfolder", "RunFolderError"), ("gapt.engine.run", "TrainingDiverged"),
               ("gapt.demo.workers", "WorkerDied")]


def user_errors() -> tuple:
    found = [getattr(sys.modules[m], name) for m, name in USER_ERRORS if m in sys.modules]
    return tuple(found) + (FileNotFoundError, ValueError)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(args.verbose)
    try:
        return args.func(args) or 0
    except BrokenPipeError:
        # `gapt keys | head`: the reader left; stop quietly, as other command-line tools do
        # (stdout is pointed at devnull so the interpreter's final flush does not fail again).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        if not isinstance(e, user_errors()):
            raise
        print(f"gapt {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        if not getattr(e, "reported", False):
            print(f"gapt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
