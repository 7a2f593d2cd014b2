"""Segmentation transforms in numpy/torch, following MMSegmentation's SETR ADE20K recipe (no mmcv).

Train: random resize of ``scale`` by a ratio in ``ratio_range`` (keep aspect) -> random crop with
``cat_max_ratio`` -> horizontal flip -> photometric distortion -> ImageNet normalisation -> pad to
the crop size (image 0 after normalisation, label 255).
Eval: resize to ``scale`` keeping aspect -> normalisation; the label stays at its original size.

Every random draw comes from the ``numpy.random.Generator`` handed to the pipeline, so an item's
augmentation is fixed by the generator's seed (see ``SegDataset``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = 255
# ImageNet mean / std on the 0..255 scale (MMSegmentation's img_norm_cfg, RGB order).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)   # MMSegmentation's multi-scale test ratios

SizeLike = Union[int, Sequence[int]]


def _pair(x: SizeLike) -> Tuple[int, int]:
    if isinstance(x, (int, np.integer)):
        return int(x), int(x)
    h, w = x
    return int(h), int(w)


# -- geometry -----------------------------------------------------------------------------------
def rescale_size(h: int, w: int, scale: Sequence[float]) -> Tuple[int, int]:
    """New (h, w) for a keep-ratio resize into ``scale`` (mmcv ``rescale_size`` semantics).

    The factor is the largest one with long side <= max(scale) and short side <= min(scale);
    the order of the two numbers in ``scale`` does not matter. Sizes round half up.
    """
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return max(int(h * factor + 0.5), 1), max(int(w * factor + 0.5), 1)


def scaled_size(height: int, width: int, ratio: float,
                base_scale: Optional[Sequence[int]] = (2048, 512)) -> Tuple[int, int]:
    """The size an image is resized to for test ratio ``ratio``.

    With ``base_scale`` (MMSegmentation 0.x MultiScaleFlipAug, which the SETR ADE20K results
    used): a keep-ratio resize into (int(base[0] * r), int(base[1] * r)). With ``None``: the
    image's own size times ``r`` (MMSegmentation 1.x TTA's ``scale_factor``).
    """
    if base_scale is None:
        return max(int(height * ratio + 0.5), 1), max(int(width * ratio + 0.5), 1)
    return rescale_size(height, width, (int(base_scale[0] * ratio), int(base_scale[1] * ratio)))


def resize_image(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8, bilinear with half-pixel centres and no antialiasing
    (as OpenCV's INTER_LINEAR, which MMSegmentation uses)."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return t[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def resize_label(label: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """(H, W) integer labels -> (h, w), nearest neighbour."""
    if tuple(label.shape) == tuple(size):
        return label
    t = torch.from_numpy(np.ascontiguousarray(label)).float()[None, None]
    t = F.interpolate(t, size=size, mode="nearest")
    return t[0, 0].to(torch.uint8 if label.dtype == np.uint8 else torch.int64).numpy().astype(label.dtype)


def random_scale(scale: Sequence[int], ratio_range: Sequence[float], rng: np.random.Generator) -> Tuple[int, int]:
    """``scale`` times a ratio drawn uniformly from ``ratio_range`` (mmcv RandomResize)."""
    lo, hi = ratio_range
    ratio = rng.random() * (hi - lo) + lo
    return int(scale[0] * ratio), int(scale[1] * ratio)


def crop_box(h: int, w: int, crop: Tuple[int, int], rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """A random (y1, y2, x1, x2) window of at most ``crop`` inside an (h, w) image."""
    off_h = int(rng.integers(0, max(h - crop[0], 0) + 1))
    off_w = int(rng.integers(0, max(w - crop[1], 0) + 1))
    return off_h, min(off_h + crop[0], h), off_w, min(off_w + crop[1], w)


def max_class_ratio(label: np.ndarray, ignore_index: int = IGNORE_INDEX) -> Tuple[int, float]:
    """(number of classes present, share of the largest one), ignored pixels left out."""
    counts = np.bincount(label.ravel().astype(np.int64), minlength=256)
    if ignore_index < len(counts):
        counts[ignore_index] = 0
    present = counts[counts > 0]
    if present.size == 0:
        return 0, 1.0
    return int(present.size), float(present.max() / present.sum())


def random_crop(image: np.ndarray, label: np.ndarray, crop: Tuple[int, int], rng: np.random.Generator,
                cat_max_ratio: float = 1.0, ignore_index: int = IGNORE_INDEX, max_tries: int = 10):
    """MMSegmentation RandomCrop: with ``cat_max_ratio`` < 1 a window is redrawn (up to ``max_tries``
    times) unless it holds more than one class and none covers ``cat_max_ratio`` or more of its
    labelled pixels; the last draw is kept when every try fails."""
    h, w = label.shape
    box = crop_box(h, w, crop, rng)
    if cat_max_ratio < 1.0:
        for _ in range(max_tries):
            y1, y2, x1, x2 = box
            n, share = max_class_ratio(label[y1:y2, x1:x2], ignore_index)
            if n > 1 and share < cat_max_ratio:
                break
            box = crop_box(h, w, crop, rng)
    y1, y2, x1, x2 = box
    return image[y1:y2, x1:x2], label[y1:y2, x1:x2]


# -- photometric distortion -------------------------------------------------------------------------
def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) float RGB in [0, 255] -> (..., 3) H in degrees [0, 360), S in [0, 1], V in [0, 255]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc = rgb.max(axis=-1)
    minc = rgb.min(axis=-1)
    delta = maxc - minc
    s = np.where(maxc > 0, delta / np.where(maxc > 0, maxc, 1), 0)
    safe = np.where(delta > 0, delta, 1)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = np.where(r == maxc, bc - gc, np.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
    h = np.where(delta > 0, (h * 60.0) % 360.0, 0.0)
    return np.stack([h, s, maxc], axis=-1).astype(np.float32)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    h6 = (h % 360.0) / 60.0
    i = np.floor(h6).astype(np.int64) % 6
    f = h6 - np.floor(h6)
    p = v * (1 - s)
    q = v * (1 - s * f)
    t = v * (1 - s * (1 - f))
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1).astype(np.float32)


def _affine_uint8(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    # MMSegmentation's convert(): scale, shift, clip, truncate to uint8
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


class PhotoMetricDistortion:
    """MMSegmentation's PhotoMetricDistortion on an RGB uint8 image; each step has probability 0.5.

    brightness (+U(-delta, delta)) -> contrast first or last (x U(range), order drawn per call) ->
    saturation (S x U(range)) -> hue (H + k, k an integer in [-hue_delta, hue_delta) in OpenCV's
    half-degree units). Saturation and hue share one float HSV round trip instead of OpenCV's
    uint8 HSV image, so values may differ from MMSegmentation by a grey level of rounding.
    """

    def __init__(self, brightness_delta: float = 32, contrast_range: Sequence[float] = (0.5, 1.5),
                 saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18):
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = int(hue_delta)

    def _contrast(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            return _affine_uint8(img, alpha=rng.uniform(*self.contrast_range))
        return img

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            img = _affine_uint8(img, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = bool(rng.integers(2))
        if contrast_first:
            img = self._contrast(img, rng)
        sat = rng.uniform(*self.saturation_range) if rng.integers(2) else None
        hue = int(rng.integers(-self.hue_delta, self.hue_delta)) if rng.integers(2) else None
        if sat is not None or hue is not None:
            hsv = rgb_to_hsv(img.astype(np.float32))
            if sat is not None:
                hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0.0, 1.0)
            if hue is not None:
                hsv[..., 0] = (hsv[..., 0] + 2.0 * hue) % 360.0
            img = np.clip(np.rint(hsv_to_rgb(hsv)), 0, 255).astype(np.uint8)
        if not contrast_first:
            img = self._contrast(img, rng)
        return img


# -- tensors ------------------------------------------------------------------------------------
def normalize(image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32, (x - mean) / std on the 0..255 scale."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (t - m) / s


def pad_to(image: torch.Tensor, label: torch.Tensor, size: Tuple[int, int], ignore_index: int = IGNORE_INDEX):
    """Pad (3, h, w) / (h, w) at the bottom and right to ``size``: image with 0, label with ignore."""
    h, w = label.shape
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    if ph == 0 and pw == 0:
        return image, label
    image = F.pad(image, (0, pw, 0, ph), value=0.0)
    label = F.pad(label, (0, pw, 0, ph), value=ignore_index)
    return image, label


def _label_tensor(label: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))


# -- pipelines ----------------------------------------------------------------------------------
class SegTrainPipeline:
    """The SETR ADE20K training augmentation; ``__call__(image, label, rng) -> (image, label)``.

    ``image``: (H, W, 3) uint8 RGB, ``label``: (H, W) uint8 with 255 = ignore. Returns a
    (3, crop_h, crop_w) float32 tensor and a (crop_h, crop_w) int64 tensor. ``scale=None``
    skips the random resize; ``photometric=False`` skips the colour distortion.
    """

    def __init__(self, crop_size: SizeLike = 512, scale: Optional[Sequence[int]] = (2048, 512),
                 ratio_range: Sequence[float] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                 flip_prob: float = 0.5, photometric: bool = True,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 ignore_index: int = IGNORE_INDEX):
        self.crop_size = _pair(crop_size)
        self.scale = tuple(scale) if scale is not None else None
        self.ratio_range = tuple(ratio_range)
        self.cat_max_ratio = float(cat_max_ratio)
        self.flip_prob = float(flip_prob)
        self.photometric = PhotoMetricDistortion() if photometric else None
        self.mean, self.std = tuple(mean), tuple(std)
        self.ignore_index = ignore_index

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        if self.scale is not None:
            size = rescale_size(*label.shape, random_scale(self.scale, self.ratio_range, rng))
            image, label = resize_image(image, size), resize_label(label, size)
        image, label = random_crop(image, label, self.crop_size, rng, self.cat_max_ratio, self.ignore_index)
        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric is not None:
            image = self.photometric(np.ascontiguousarray(image), rng)
        return pad_to(normalize(image, self.mean, self.std), _label_tensor(label), self.crop_size,
                      self.ignore_index)

    def __repr__(self) -> str:
        return (f"SegTrainPipeline(crop_size={self.crop_size}, scale={self.scale}, ratio_range={self.ratio_range}, "
                f"cat_max_ratio={self.cat_max_ratio}, flip_prob={self.flip_prob}, "
                f"photometric={self.photometric is not None})")


class SegEvalPipeline:
    """Resize to ``scale`` keeping aspect (``None``: keep the original size), normalise; the label
    is returned at its original size. ``rng`` is accepted and unused."""

    def __init__(self, scale: Optional[Sequence[int]] = (2048, 512),
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.scale = tuple(scale) if scale is not None else None
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: Optional[np.random.Generator] = None):
        if self.scale is not None:
            image = resize_image(image, rescale_size(*image.shape[:2], self.scale))
        return normalize(image, self.mean, self.std), _label_tensor(label)

    def __repr__(self) -> str:
        return f"SegEvalPipeline(scale={self.scale})"


class SegMultiScalePipeline:
    """Multi-scale test input as MMSegmentation's MultiScaleFlipAug + Resize + Normalize: for every
    ratio, a keep-ratio resize of the decoded original uint8 image into ``scale`` x ratio
    (:func:`scaled_size`), then normalisation. Returns (list of (3, h_r, w_r) float32 tensors, one
    per ratio, label at its original size); flips are taken at inference. ``rng`` is unused."""

    def __init__(self, scale: Optional[Sequence[int]] = (2048, 512),
                 ratios: Sequence[float] = MS_RATIOS,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        if not len(ratios):
            raise ValueError("SegMultiScalePipeline needs at least one ratio")
        self.scale = tuple(scale) if scale is not None else None
        self.ratios = tuple(float(r) for r in ratios)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: Optional[np.random.Generator] = None):
        h, w = image.shape[:2]
        pyramid = [normalize(resize_image(image, scaled_size(h, w, r, self.scale)), self.mean, self.std)
                   for r in self.ratios]
        return pyramid, _label_tensor(label)

    def __repr__(self) -> str:
        return f"SegMultiScalePipeline(scale={self.scale}, ratios={self.ratios})"
