"""`gapt export`: a finished run as a merged timm ViT or an HF peft adapter, and a peft adapter as a gapt tuned file.

    gapt export RUN --merged FILE.safetensors      # LoRA / SSF / BitFit / full folded: a plain timm ViT + head
    gapt export RUN --peft FOLDER                  # LoRA + head as a peft adapter folder
    gapt export --from-peft FOLDER --backbone mae_vitb16 --weights W --tuned OUT.safetensors

Nothing heavy is imported at module level (``gapt --help`` stays fast).
"""
from __future__ import annotations

import json
import sys

EPILOG = ("--merged: every part must fold into the frozen weights (lora, ssf, bitfit, full, linear); prompts and "
          "adapters cannot, and the error says which part. gapt.load_merged(FILE) rebuilds the timm model. "
          "--peft: method=lora only; PeftModel.from_pretrained(timm_model, FOLDER) loads it on the run's frozen "
          "timm ViT (gapt.model.timm_classifier(model, merged=False)). --from-peft: a peft LoRA adapter of a timm "
          "ViT (target_modules=['qkv'], the head in modules_to_save) becomes a gapt tuned file for "
          "gapt.load_model(OUT, weights=W).")


def cmd_export(args) -> int:
    if args.from_peft:
        return _from_peft(args)
    if not args.run or not (args.merged or args.peft):
        raise SystemExit("gapt export: give RUN with --merged FILE and/or --peft FOLDER, or --from-peft FOLDER")
    from ..cli_support import run_overrides
    from .inference import load_run
    _, model, _ = load_run(args.run, run_overrides(args))
    out = {"run": args.run, "method": model.method}
    if args.merged:
        from ..model.merge import save_merged
        save_merged(model, args.merged)
        out["merged"] = args.merged
    if args.peft:
        model.save_peft(args.peft)
        out["peft"] = args.peft
    print(json.dumps(out) if args.json else "\n".join(f"wrote {k}: {v}" for k, v in out.items()
                                                      if k in ("merged", "peft")))
    return 0


def _from_peft(args) -> int:
    import warnings
    from pathlib import Path
    from ..model import build_model
    from ..model.checkpoints import CheckpointError
    from ..model.peft_io import CONFIG, PREFIX, _read_weights, check_peft_config
    if not (args.backbone and args.tuned):
        raise SystemExit("gapt export --from-peft: --backbone and --tuned are needed")
    folder = Path(args.from_peft)
    if not (folder / CONFIG).is_file():
        raise CheckpointError(f"{folder} is not a peft adapter folder (no {CONFIG})")
    config = json.loads((folder / CONFIG).read_text())
    check_peft_config(config, folder)
    head = _read_weights(folder).get(f"{PREFIX}head.weight")
    num_classes = args.num_classes or (int(head.shape[0]) if head is not None else 0)
    if not num_classes:
        raise SystemExit("gapt export --from-peft: the adapter holds no head; give --num-classes")
    with warnings.catch_warnings():
        if args.weights is None:
            warnings.simplefilter("ignore")
        model = build_model(args.backbone, "lora", lora_rank=int(config["r"]), lora_alpha=float(config["lora_alpha"]),
                            num_classes=num_classes, weights=args.weights, image_size=args.image_size,
                            pooling=args.pooling or "")
    model.load_peft(str(folder))
    model.save_tuned(args.tuned, extra={"from_peft": str(folder)})
    print(json.dumps({"tuned": args.tuned, "method": "lora", "r": model.part("lora").rank}) if args.json
          else f"wrote {args.tuned} (lora r={model.part('lora').rank}, {num_classes} classes)")
    return 0


def add_commands(subparsers) -> None:
    """Add `gapt export` to the gapt command line (see gapt.cli.COMMAND_MODULES)."""
    from ..cli_support import add_run_override_args
    e = subparsers.add_parser("export", help="a run as a merged timm ViT (--merged) or a peft adapter (--peft); "
                                             "a peft adapter as a gapt tuned file (--from-peft)", epilog=EPILOG)
    e.add_argument("run", nargs="?", help="a finished run folder")
    e.add_argument("--merged", metavar="FILE.safetensors", help="write the run merged into a plain timm ViT + head")
    e.add_argument("--peft", metavar="FOLDER", help="write the run's LoRA and head as a peft adapter folder")
    e.add_argument("--from-peft", metavar="FOLDER", help="read a peft LoRA adapter (instead of RUN)")
    e.add_argument("--backbone", help="--from-peft: the gapt backbone name the adapter was trained on")
    e.add_argument("--image-size", type=int, default=None, help="--from-peft: input side in pixels")
    e.add_argument("--pooling", default="", help="--from-peft: how the timm model pooled (cls | mean | "
                                                 "mean_normed; default: the backbone's rule)")
    e.add_argument("--num-classes", type=int, default=0, help="--from-peft: classes, when the adapter has no head")
    e.add_argument("--tuned", metavar="OUT.safetensors", help="--from-peft: the gapt tuned file to write")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    add_run_override_args(e, data_root=False)
    e.set_defaults(func=cmd_export)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `gapt export ...`")
