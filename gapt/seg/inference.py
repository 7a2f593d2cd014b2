"""Whole-image, sliding-window and multi-scale + flip inference (MMSegmentation semantics).

``model_fn`` maps a normalised (B, 3, h, w) batch to (B, C, h, w) logits (logits of another size
are resized bilinearly to the window). All functions run under ``torch.no_grad``.
"""
from __future__ import annotations

import numbers
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .transforms import MS_RATIOS, scaled_size  # noqa: F401 (re-exported)

ModelFn = Callable[[torch.Tensor], torch.Tensor]
SizeLike = Union[int, Sequence[int]]


def _pair(x: SizeLike) -> Tuple[int, int]:
    if isinstance(x, numbers.Integral):
        return int(x), int(x)
    h, w = x
    return int(h), int(w)


def _resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _run(model_fn: ModelFn, x: torch.Tensor) -> torch.Tensor:
    return _resize(model_fn(x).float(), tuple(x.shape[-2:]))


@torch.no_grad()
def whole_inference(model_fn: ModelFn, image: torch.Tensor) -> torch.Tensor:
    """Logits of the whole (B, 3, H, W) image in one pass, (B, C, H, W) float32."""
    return _run(model_fn, image)


def slide_windows(height: int, width: int, crop: SizeLike = 512, stride: SizeLike = 341):
    """The (y1, y2, x1, x2) windows of MMSegmentation's slide inference.

    ``ceil((H - crop) / stride) + 1`` rows of windows (one if the image is smaller than the
    crop), the last flush with the border; windows are clipped to the image, so an image smaller
    than the crop is one window of its own size.
    """
    ch, cw = _pair(crop)
    sh, sw = _pair(stride)
    if min(ch, cw, sh, sw) < 1:
        raise ValueError(f"crop and stride must be positive, got crop={crop}, stride={stride}")
    h_grids = max(height - ch + sh - 1, 0) // sh + 1
    w_grids = max(width - cw + sw - 1, 0) // sw + 1
    out = []
    for i in range(h_grids):
        for j in range(w_grids):
            y2, x2 = min(i * sh + ch, height), min(j * sw + cw, width)
            out.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return out


@torch.no_grad()
def slide_inference(model_fn: ModelFn, image: torch.Tensor, num_classes: int, crop: SizeLike = 512,
                    stride: SizeLike = 341) -> torch.Tensor:
    """Overlapping-window logits, (B, C, H, W) float32: each window's logits are summed into place
    and every pixel divided by the number of windows that covered it."""
    b, _, h, w = image.shape
    logits = torch.zeros((b, num_classes, h, w), dtype=torch.float32, device=image.device)
    count = torch.zeros((1, 1, h, w), dtype=torch.float32, device=image.device)
    for y1, y2, x1, x2 in slide_windows(h, w, crop, stride):
        out = _run(model_fn, image[:, :, y1:y2, x1:x2])
        if out.shape[:2] != (b, num_classes):
            raise ValueError(f"model returned shape {tuple(out.shape)} for a batch of {b}, "
                             f"expected {num_classes} classes")
        logits[:, :, y1:y2, x1:x2] += out
        count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def inference(model_fn: ModelFn, image: torch.Tensor, num_classes: int, mode: str = "slide",
              crop: SizeLike = 512, stride: SizeLike = 341) -> torch.Tensor:
    """Logits at the image's size by ``slide`` or ``whole`` inference."""
    if mode == "slide":
        return slide_inference(model_fn, image, num_classes, crop, stride)
    if mode == "whole":
        return whole_inference(model_fn, image)
    raise ValueError(f"inference mode must be 'slide' or 'whole', got '{mode}'")


@torch.no_grad()
def multiscale_inference(model_fn: ModelFn, image: torch.Tensor, num_classes: int,
                         scales: Sequence[float] = MS_RATIOS, flip: bool = True,
                         base_scale: Optional[Sequence[int]] = (2048, 512), mode: str = "slide",
                         crop: SizeLike = 512, stride: SizeLike = 341,
                         out_size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Class probabilities (B, C, *out_size) averaged over test scales (and horizontal flips),
    each scale resized (bilinear) from the normalised tensor ``image``.

    MMSegmentation resizes every scale from the decoded uint8 image instead; evaluation does
    that (``SegMultiScalePipeline`` + :func:`pyramid_inference`). This tensor path stays for
    callers that only hold a tensor. ``scales=(1.0,), flip=False`` is single-scale testing.
    """
    _, _, h, w = image.shape
    out_size = (h, w) if out_size is None else out_size
    pyramid = [_resize(image, scaled_size(h, w, ratio, base_scale)) for ratio in scales]
    return pyramid_inference(model_fn, pyramid, num_classes, flip, mode, crop, stride, out_size)


@torch.no_grad()
def pyramid_inference(model_fn: ModelFn, images: Sequence[torch.Tensor], num_classes: int, flip: bool = True,
                      mode: str = "slide", crop: SizeLike = 512, stride: SizeLike = 341,
                      out_size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Class probabilities (B, C, *out_size) averaged over ``images``, one normalised (B, 3, h, w)
    tensor per test scale (e.g. ``SegMultiScalePipeline``'s, each resized from the original image).

    Each scale is run by ``mode`` inference (and again mirrored, the logits mirrored back); the
    logits are resized bilinearly to ``out_size`` (default: the first image's size; pass the
    label's size), turned into softmax probabilities, and the probabilities averaged, as
    MMSegmentation's aug_test / SegTTAModel do.
    """
    if not len(images):
        raise ValueError("multi-scale inference needs at least one scale")
    out_size = tuple(images[0].shape[-2:]) if out_size is None else (int(out_size[0]), int(out_size[1]))
    probs, n = None, 0
    for x in images:
        for mirrored in ((False, True) if flip else (False,)):
            inp = x.flip(-1) if mirrored else x
            logits = inference(model_fn, inp, num_classes, mode, crop, stride)
            if mirrored:
                logits = logits.flip(-1)
            p = _resize(logits, out_size).softmax(dim=1)
            probs = p if probs is None else probs.add_(p)
            n += 1
    return probs / n
