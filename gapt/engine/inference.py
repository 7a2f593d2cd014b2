"""A finished run folder -> its model: `gapt eval` (a split's top-1) and `gapt predict` (class probabilities)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import torch

from .. import config as C
from ..model import load_model
from . import runfolder as rf
from .precision import precision_record, precision_scope
from .run import resolve_device
from .trainer import evaluate


def load_run(run_dir: str, overrides: Sequence[str] = ()):
    """(config, model with its best-val tuned state, results.json or {}).

    ``overrides`` (``KEY=VALUE``) change the saved config for this use only, e.g. ``device=cpu``
    or ``data.root=...`` for a run moved to another machine.
    """
    run = Path(run_dir)
    if not (run / rf.CONFIG).exists():
        raise rf.RunFolderError(f"{run_dir} is not a gapt run folder (no {rf.CONFIG})")
    if not (run / rf.TUNED).exists():
        raise rf.RunFolderError(f"{run_dir} has no {rf.TUNED} yet (is the run finished?)")
    cfg = C.load_config(str(run / rf.CONFIG), list(overrides), saved=True)
    rf.check_run_weights(run_dir, cfg.weights)
    model = load_model(str(run / rf.TUNED), weights=cfg.weights, random_seed=cfg.train.seed)
    results = rf.read_json(run / rf.RESULTS) if (run / rf.RESULTS).exists() else {}
    return cfg, model.eval(), results


def eval_run(run_dir: str, split: str = "test", overrides: Sequence[str] = ()) -> Dict:
    from ..data import build_datasets
    cfg, model, _ = load_run(run_dir, overrides)
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split '{split}'; valid: train, val, test")
    device = resolve_device(cfg)
    model.to(device)
    bundle = build_datasets(cfg.data, image_size=cfg.image_size, seed=cfg.train.seed, splits=(split,))
    dataset = getattr(bundle, split)
    bs = cfg.train.eval_batch_size or 2 * cfg.train.batch_size
    with precision_scope(cfg.train.precision, device) as dtype:  # the run's precision (fp32: TF32 off)
        out = evaluate(model, dataset, bs, device, dtype, cfg.data.num_workers, desc=split)
        record = precision_record(cfg.train.precision, device)
    return {"run": str(run_dir), "split": split, "top1": out["top1"], "loss": out["loss"], "count": out["count"],
            **record}


def expand_images(paths: List[str]) -> List[Path]:
    """Image files as given, and every image under a given folder (recursive, sorted)."""
    from ..data import IMAGE_EXTENSIONS
    out: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS)
                           and not f.name.startswith("."))
            if not found:
                raise FileNotFoundError(f"no images in folder {p} (looked for {', '.join(IMAGE_EXTENSIONS)})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"image not found: {p}")
    return out


@torch.no_grad()
def predict(run_dir: str, images: List[str], top_k: int = 5, batch_size: int = 32,
            overrides: Sequence[str] = (), skip_bad: bool = False) -> List[Dict]:
    """Top-k classes per image (files or folders of images), in batches, with the run's precision.

    An image that cannot be read stops everything, unless ``skip_bad``: then its entry is
    ``{"image": path, "error": reason, "top": []}`` and the others are predicted.
    """
    from ..data import eval_transform
    cfg, model, results = load_run(run_dir, overrides)
    files = expand_images(images)  # every path checked before the first forward
    info = results.get("data") or {"format": cfg.data.format, "name": cfg.data.name}
    transform = eval_transform(info, cfg.image_size)
    device = resolve_device(cfg)
    model.to(device)
    with precision_scope(cfg.train.precision, device) as dtype:
        return _predict(model, files, transform, device, dtype, top_k, batch_size, skip_bad)


def _predict(model, files, transform, device, dtype, top_k: int, batch_size: int,
             skip_bad: bool = False) -> List[Dict]:
    from PIL import Image
    from .progress import Progress
    out = []
    bar = Progress((len(files) + batch_size - 1) // batch_size, "predict", enabled=len(files) > batch_size)
    for first in range(0, len(files), batch_size):
        tensors, chunk = [], []
        for path in files[first:first + batch_size]:
            try:
                tensors.append(transform(Image.open(path).convert("RGB")))
                chunk.append(path)
            except Exception as e:
                if not skip_bad:
                    raise ValueError(f"cannot read image {path}: {e}; --skip-bad skips such images") from None
                out.append({"image": str(path), "error": f"{type(e).__name__}: {e}", "top": []})
        bar.update()
        if not tensors:
            continue
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(torch.stack(tensors).to(device))
        top = logits.float().softmax(-1).cpu().topk(min(top_k, logits.shape[-1]))
        for path, values, indices in zip(chunk, top.values.tolist(), top.indices.tolist()):
            out.append({"image": str(path), "top": [
                {"class": model.class_names[i], "index": int(i), "probability": float(p)}
                for p, i in zip(values, indices)]})
    bar.close()
    return out
