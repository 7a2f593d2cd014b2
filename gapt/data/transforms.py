"""Image transforms: the reference resizes, ImageNet normalisation, and ``eval_transform``.

Every un-augmented path goes through a :class:`FixedSizeDecoder`: image -> uint8 (S, S, 3)
-> normalised float32 (3, S, S). The uint8 step is what the decoded-image cache stores, so
a cached item and an uncached one are the same tensor bit for bit.

Resize kinds:

``center_crop`` (FGVC, folder, csv eval splits)
    torchvision ``Resize(S * 8 // 7)`` (shorter side, PIL bilinear with antialias), then
    ``CenterCrop(S)``: 224 -> 256 -> 224, as VPT's FGVC loader.
``tf_bilinear`` (VTAB default)
    What VPT/GaPT's TFDS pipeline does. Their loader imports ``tensorflow.compat.v1 as tf``
    and calls ``tf.image.resize(image, [S, S])``, i.e. the TF1 ``resize_bilinear`` kernel
    with ``align_corners=False`` and ``half_pixel_centers=False``: output pixel ``i`` samples
    source coordinate ``i * in / out`` (no half-pixel offset, so the image shifts by up to
    half a source pixel towards the top-left and the last rows/columns repeat the edge),
    with no antialiasing when shrinking. :func:`tf_resize_bilinear` reproduces the kernel
    in float32 (same weights, same lerp order). The reference keeps the float result;
    gapt rounds it to the nearest uint8 (``rint``, ties to even, clipped to 0..255) so the
    cache can hold uint8. That differs from the reference by at most 0.5/255 per pixel
    before normalisation (<= 0.0087 after dividing by the ImageNet std).
``antialias``
    torchvision ``Resize((S, S))`` on the PIL image: bilinear with antialias.

Normalisation everywhere: ``x / 255``, then ``(x - mean) / std`` with ImageNet mean/std,
in the same float32 operation order as torchvision's ``ToTensor`` + ``Normalize`` (applied
once to the 256 possible levels, then looked up: identical values, no per-item torch ops).
"""
from __future__ import annotations

from typing import Mapping, Tuple

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALISATION = "imagenet mean/std"

_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)

EVAL_KINDS = ("center_crop", "tf_bilinear", "antialias")


def resize_dim(image_size: int) -> int:
    """Shorter-side size before cropping: 224 -> 256, 384 -> 438, 448 -> 512 (VPT's table)."""
    return image_size * 8 // 7


def load_rgb(path: str) -> Image.Image:
    """Decode an image file to RGB (grey, palette, CMYK and RGBA are converted)."""
    with Image.open(path) as im:
        return im.convert("RGB")


def _normalisation_table() -> np.ndarray:
    # (3, 256): the normalised value of every uint8 level per channel, computed with the same
    # float32 operations as torchvision's ToTensor + Normalize, so a lookup is bit-identical.
    levels = torch.arange(256, dtype=torch.float32).view(1, 1, 256).expand(3, 1, 256)
    return levels.div(255).sub(_MEAN).div(_STD).reshape(3, 256).numpy().copy()


_TABLE = _normalisation_table()


def to_normalised_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) ImageNet-normalised (a table lookup per channel)."""
    a = np.asarray(image, dtype=np.uint8)
    out = np.empty((3,) + a.shape[:2], dtype=np.float32)
    for c in range(3):
        np.take(_TABLE[c], a[:, :, c], out=out[c])
    return torch.from_numpy(out)


def _tf_interpolation(in_size: int, out_size: int, half_pixel_centers: bool):
    """Lower/upper source indices and lerp weights of TF's ``compute_interpolation_weights``."""
    scale = np.float32(in_size) / np.float32(out_size)
    pos = np.arange(out_size, dtype=np.float32)
    if half_pixel_centers:
        pos = (pos + np.float32(0.5)) * scale - np.float32(0.5)
    else:
        pos = pos * scale
    floor = np.floor(pos)
    upper = np.minimum(np.ceil(pos).astype(np.int64), in_size - 1)
    lower = np.minimum(np.maximum(floor.astype(np.int64), 0), upper)
    return lower, upper, (pos - floor).astype(np.float32)


def tf_resize_bilinear(image: np.ndarray, size: Tuple[int, int],
                       half_pixel_centers: bool = False) -> np.ndarray:
    """TensorFlow's bilinear ``ResizeBilinear`` kernel (no antialias) on an (H, W, C) array.

    Returns float32 (out_h, out_w, C), unrounded, like TF. ``half_pixel_centers=False`` is
    TF1 / ``tf.compat.v1.image.resize`` (the VTAB reference); ``True`` is TF2's
    ``tf.image.resize`` and equals torch ``F.interpolate(bilinear, align_corners=False,
    antialias=False)``.
    """
    src = np.asarray(image)
    if src.ndim == 2:
        src = src[:, :, None]
    out_h, out_w = size
    y_lo, y_hi, y_lerp = _tf_interpolation(src.shape[0], out_h, half_pixel_centers)
    x_lo, x_hi, x_lerp = _tf_interpolation(src.shape[1], out_w, half_pixel_centers)
    top_rows, bottom_rows = src[y_lo], src[y_hi]   # gather in the input dtype, convert only what is used
    tl, tr = top_rows[:, x_lo].astype(np.float32), top_rows[:, x_hi].astype(np.float32)
    bl, br = bottom_rows[:, x_lo].astype(np.float32), bottom_rows[:, x_hi].astype(np.float32)
    xl = x_lerp[None, :, None]
    top = tl + (tr - tl) * xl
    bottom = bl + (br - bl) * xl
    return top + (bottom - top) * y_lerp[:, None, None]


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8)


class FixedSizeDecoder:
    """Deterministic image -> uint8 (S, S, 3) -> normalised tensor (an eval transform).

    ``decoder(pil_image)`` returns the normalised tensor; ``decoder.to_uint8(pil_image)`` and
    ``decoder.load_uint8(path)`` return the uint8 array the cache stores.
    """

    def __init__(self, kind: str, image_size: int):
        if kind not in EVAL_KINDS:
            raise ValueError(f"unknown resize kind {kind!r}; choose one of {list(EVAL_KINDS)}")
        self.kind = kind
        self.image_size = int(image_size)

    @property
    def description(self) -> str:
        s = self.image_size
        if self.kind == "center_crop":
            return f"resize {resize_dim(s)} + center crop {s}"
        if self.kind == "tf_bilinear":
            return (f"tf_bilinear {s}x{s} (no antialias, TF1 resize_bilinear: align_corners=False, "
                    f"half_pixel_centers=False; rounded to uint8)")
        return f"antialias {s}x{s} (PIL bilinear with antialias)"

    def to_uint8(self, img: Image.Image) -> np.ndarray:
        import torchvision.transforms.functional as TF
        s = self.image_size
        img = img.convert("RGB")
        if self.kind == "center_crop":
            out = TF.center_crop(TF.resize(img, resize_dim(s)), [s, s])
            return np.asarray(out, dtype=np.uint8)
        if self.kind == "antialias":
            return np.asarray(TF.resize(img, [s, s]), dtype=np.uint8)
        return _to_uint8(tf_resize_bilinear(np.asarray(img, dtype=np.uint8), (s, s)))

    def load_uint8(self, path: str) -> np.ndarray:
        return self.to_uint8(load_rgb(path))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return to_normalised_tensor(self.to_uint8(img))

    def __repr__(self) -> str:
        return f"FixedSizeDecoder({self.description})"


class TrainAugment:
    """FGVC-style training augmentation: Resize(S*8/7) -> RandomCrop(S) -> flip -> normalise.

    The resize is deterministic, so a cache can hold its uint8 output (``load_resized_uint8``)
    and ``from_resized`` applies only the random part: the same pixels and the same random
    draws as decoding the file every epoch.
    """

    def __init__(self, image_size: int):
        import torchvision.transforms as T
        self.image_size = int(image_size)
        self._resize = T.Resize(resize_dim(self.image_size))
        self._random = T.Compose([T.RandomCrop(self.image_size), T.RandomHorizontalFlip(0.5)])

    @property
    def description(self) -> str:
        s = self.image_size
        return f"resize {resize_dim(s)} + random crop {s} + horizontal flip"

    def resized_shape(self, width: int, height: int) -> Tuple[int, int, int]:
        """(H, W, 3) after the resize of a width x height image (torchvision's rule for an int size)."""
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = resize_dim(self.image_size), int(resize_dim(self.image_size) * long / short)
        return (new_long, new_short, 3) if width <= height else (new_short, new_long, 3)

    def load_resized_uint8(self, path: str) -> np.ndarray:
        return np.asarray(self._resize(load_rgb(path)), dtype=np.uint8)

    def from_resized(self, array: np.ndarray) -> torch.Tensor:
        out = self._random(Image.fromarray(np.ascontiguousarray(array)))
        return to_normalised_tensor(np.asarray(out, dtype=np.uint8))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        out = self._random(self._resize(img.convert("RGB")))
        return to_normalised_tensor(np.asarray(out, dtype=np.uint8))

    def __repr__(self) -> str:
        return f"TrainAugment({self.description})"


def _infer_eval_kind(info: Mapping) -> str:
    fmt = info.get("format", "")
    if fmt == "vtab":
        return "antialias" if str(info.get("resize", "")).startswith("antialias") else "tf_bilinear"
    if fmt in ("fgvc", "folder", "csv"):
        return "center_crop"
    return "antialias"  # generated datasets: plain resize to S x S


def eval_transform(info: Mapping, image_size: int) -> FixedSizeDecoder:
    """The deterministic transform a bundle's eval splits use, as a PIL.Image -> tensor callable.

    ``info`` is ``bundle.info`` or the same dict read back from a run's results.json.
    """
    kind = info.get("eval_resize") or _infer_eval_kind(info)
    return FixedSizeDecoder(kind, image_size)
