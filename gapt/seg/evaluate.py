"""Segmentation evaluation (`gapt seg eval`) and prediction (`gapt seg predict`) of a run folder.

Evaluation follows MMSegmentation's SETR ADE20K test: keep-ratio resize into (4 x crop, crop)
(2048 x 512 for crop 512), sliding windows of ``crop_size`` with stride round(2/3 crop) (341),
logits resized to the original label size, argmax; multi-scale adds ratios 0.5..1.75 (each a
keep-ratio resize of the decoded original image, as MultiScaleFlipAug) and horizontal flips,
averaging softmax probabilities. Pixels are counted in one confusion matrix;
under torchrun every process takes images rank, rank + world, ... and the matrices are summed,
so every image counts once.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from .. import config as C
from ..engine import distributed as dist
from ..engine import runfolder as rf
from ..engine.inference import expand_images
from ..engine.progress import Progress
from ..engine.precision import precision_record, precision_scope
from ..engine.run import autocast_dtype, in_process_group, resolve_device
from .data import load_image
from .inference import pyramid_inference, slide_inference
from .metrics import SegMetrics, confusion_matrix, reduce_confusion
from .model import load_seg_model
from .palette import save_mask_png, save_overlay_png
from .recipe import EVAL_FILE, eval_pipeline, seg_dataset, slide_stride, train_scale
from .transforms import MS_RATIOS, SegMultiScalePipeline

log = logging.getLogger("gapt")


def _model_fn(model, device, dtype):
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return model(x)
    return run


def multiscale_pipeline(crop_size: int) -> SegMultiScalePipeline:
    """The multi-scale test input: ratios 0.5..1.75 of the eval scale, each from the original image."""
    return SegMultiScalePipeline(scale=train_scale(crop_size), ratios=MS_RATIOS)


def multiscale_view(dataset, crop_size: int):
    """``dataset`` (a SegDataset) with the multi-scale pipeline: items hold one tensor per ratio."""
    if not hasattr(dataset, "pipeline"):
        raise TypeError(f"multi-scale evaluation needs a SegDataset (it re-reads the original images), "
                        f"got {type(dataset).__name__}")
    view = copy.copy(dataset)
    view.pipeline = multiscale_pipeline(crop_size)
    return view


@torch.no_grad()
def predict_logits(model, image, out_size, crop_size: int, device, dtype,
                   multi_scale: bool = False) -> torch.Tensor:
    """(1, C, *out_size) scores: slide logits of a normalised (1, 3, h, w) image, or with
    ``multi_scale`` the flip-averaged probabilities of a list of such tensors, one per test ratio
    (:func:`multiscale_pipeline`'s, each resized from the original image)."""
    fn = _model_fn(model, device, dtype)
    n, stride = model.num_classes, slide_stride(crop_size)
    if multi_scale:
        if isinstance(image, torch.Tensor):
            raise TypeError("multi-scale prediction takes one tensor per test ratio, resized from the original "
                            "image (multiscale_pipeline), not one tensor")
        return pyramid_inference(fn, [x.to(device) for x in image], n, flip=True, mode="slide", crop=crop_size,
                                 stride=stride, out_size=tuple(out_size))
    image = image.to(device)
    logits = slide_inference(fn, image, n, crop_size, stride)
    if tuple(logits.shape[-2:]) != tuple(out_size):
        logits = torch.nn.functional.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    return logits


@torch.no_grad()
def evaluate_seg(model, dataset, crop_size: int, device, dtype=None, workers: int = 0, multi_scale: bool = False,
                 desc: str = "eval") -> SegMetrics:
    """mIoU / mAcc / aAcc / per-class IoU over ``dataset`` (eval pipeline items), one confusion
    matrix summed over processes."""
    model.eval()
    if multi_scale:
        dataset = multiscale_view(dataset, crop_size)
    loader = DataLoader(dataset, batch_size=1, sampler=dist.ShardSampler(len(dataset)), num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    n = model.num_classes
    cm = torch.zeros((n, n), dtype=torch.int64, device=device)
    bar = Progress(len(loader), desc, enabled=dist.is_main())
    for batch in loader:
        label = batch["label"].to(device)
        scores = predict_logits(model, batch["image"], label.shape[-2:], crop_size, device, dtype, multi_scale)
        cm += confusion_matrix(scores.argmax(1), label, n)
        bar.update()
    bar.close()
    cm = reduce_confusion(cm)
    return SegMetrics.from_confusion(cm.cpu(), getattr(dataset, "class_names", None))


def write_eval_file(run_dir, split: str, single: SegMetrics, multi: Optional[SegMetrics] = None,
                    extra: Optional[Dict] = None) -> Path:
    """``eval_<split>.json``: single-scale (and multi-scale) metrics with per-class IoU / Acc."""
    body: Dict = {"split": split, **(extra or {}), "single_scale": single.as_dict(per_class=True)}
    if multi is not None:
        body["multi_scale"] = multi.as_dict(per_class=True)
    path = Path(run_dir) / EVAL_FILE.format(split=split)
    rf.write_json(path, body)
    return path


# -- run folders ----------------------------------------------------------------------------------
def load_seg_run(run_dir: str, weights: Optional[str] = "__config__", overrides: Sequence[str] = ()):
    """(config, segmentation model with the run's tuned state, results.json or {}); ``overrides``
    (``KEY=VALUE``, e.g. ``device=cpu``, ``data.root=...``) change the saved config for this use."""
    run = Path(run_dir)
    if not (run / rf.CONFIG).exists():
        raise rf.RunFolderError(f"{run_dir} is not a gapt run folder (no {rf.CONFIG})")
    if not (run / rf.TUNED).exists():
        raise rf.RunFolderError(f"{run_dir} has no {rf.TUNED} yet (is the run finished? continue it with "
                                f"`gapt seg train --resume {run_dir}`)")
    cfg = C.load_config(str(run / rf.CONFIG), list(overrides), saved=True)
    if weights == "__config__":
        rf.check_run_weights(run_dir, cfg.weights)
    model, _ = load_seg_model(run / rf.TUNED, cfg, cfg.weights if weights == "__config__" else weights)
    results = rf.read_json(run / rf.RESULTS) if (run / rf.RESULTS).exists() else {}
    return cfg, model, results


def eval_run(run_dir: str, split: str = "val", multi_scale: bool = False, overrides: Sequence[str] = ()) -> Dict:
    """Evaluate a finished run on a split; writes ``eval_<split>.json`` and, for val, updates
    results.json's metrics (``mIoU``, ``mAcc``, ``aAcc``; ``*_ms`` with ``multi_scale``)."""
    if split not in ("train", "val"):
        raise ValueError(f"unknown split '{split}'; valid: train, val")
    cfg, model, results = load_seg_run(run_dir, overrides=overrides)
    return in_process_group(cfg, lambda device: _eval_run(run_dir, split, multi_scale, cfg, model, results, device))


def _eval_run(run_dir, split, multi_scale, cfg, model, results, device) -> Dict:
    model.to(device)
    dtype = autocast_dtype(cfg, device)
    dataset = seg_dataset(cfg, split, eval_pipeline(cfg.seg.crop_size), cfg.train.seed)
    single = evaluate_seg(model, dataset, cfg.seg.crop_size, device, dtype, cfg.data.num_workers, desc=split)
    multi = (evaluate_seg(model, dataset, cfg.seg.crop_size, device, dtype, cfg.data.num_workers, multi_scale=True,
                          desc=f"{split} multi-scale") if multi_scale else None)
    record = precision_record(cfg.train.precision, device)
    out = {"run": str(run_dir), "split": split, "images": len(dataset), **single.as_dict(), **record}
    if multi is not None:
        out.update({f"{k}_ms": v for k, v in multi.as_dict().items()})
    if dist.is_main():
        write_eval_file(run_dir, split, single, multi, record)
        if split == "val" and results:
            metrics = dict(results.get("metrics") or {})
            metrics.update({k: out[k] for k in ("mIoU", "mAcc", "aAcc")})
            if multi is not None:
                metrics.update({k: out[k] for k in ("mIoU_ms", "mAcc_ms", "aAcc_ms")})
            results["metrics"] = metrics
            rf.write_json(Path(run_dir) / rf.RESULTS, results)
    out["per_class"] = single.per_class()
    return out


@torch.no_grad()
def predict_run(run_dir: str, images: List[str], out_dir: Optional[str] = None, multi_scale: bool = False,
                alpha: float = 0.5, overrides: Sequence[str] = ()) -> List[Dict]:
    """Colour-coded masks (``<stem>_mask.png``, palette PNG whose values are the class indices)
    and overlays (``<stem>_overlay.png``) for image files or folders of images; default folder
    ``<run>/predictions``."""
    cfg, model, _ = load_seg_run(run_dir, overrides=overrides)
    files = expand_images(images)  # every path checked before the first forward
    device = resolve_device(cfg)
    model.to(device)
    pipe = multiscale_pipeline(cfg.seg.crop_size) if multi_scale else eval_pipeline(cfg.seg.crop_size)
    out = Path(out_dir) if out_dir else Path(run_dir) / "predictions"
    out.mkdir(parents=True, exist_ok=True)
    with precision_scope(cfg.train.precision, device) as dtype:  # the run's precision (fp32: TF32 off)
        return _predict_files(model, cfg, files, pipe, out, device, dtype, multi_scale, alpha)


def _predict_files(model, cfg, files, pipe, out: Path, device, dtype, multi_scale: bool, alpha: float) -> List[Dict]:
    done, stems = [], set()
    bar = Progress(len(files), "seg predict", enabled=len(files) > 1)
    for path in files:
        rgb = load_image(path)
        tensor, _ = pipe(rgb, np.zeros(rgb.shape[:2], dtype=np.uint8))
        batch = [t[None] for t in tensor] if multi_scale else tensor[None]
        scores = predict_logits(model, batch, rgb.shape[:2], cfg.seg.crop_size, device, dtype, multi_scale)
        mask = scores.argmax(1)[0].to(torch.uint8).cpu().numpy()
        stem = Path(path).stem
        if stem in stems:  # two inputs with one name: keep both
            stem = f"{stem}_{len(stems)}"
        stems.add(stem)
        mask_path = save_mask_png(out / f"{stem}_mask.png", mask)
        overlay_path = save_overlay_png(out / f"{stem}_overlay.png", rgb, mask, alpha=alpha)
        counts = np.bincount(mask.ravel(), minlength=model.num_classes)
        present = [{"class": model.class_names[i], "index": int(i), "share": float(counts[i] / mask.size)}
                   for i in np.argsort(-counts) if counts[i] > 0]
        done.append({"image": str(path), "mask": str(mask_path), "overlay": str(overlay_path), "classes": present})
        bar.update()
    bar.close()
    return done
