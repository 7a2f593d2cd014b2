"""ADE20K class names, a deterministic colour palette, and PNG writers for masks and overlays."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

IGNORE_INDEX = 255

# The 150 SceneParsing classes in label order (label k here = annotation value k + 1).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock",
    "flag",
)
assert len(ADE20K_CLASSES) == 150


def make_palette(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 colours for labels 0..n-1; the ignore label 255 (if present) is black.

    Label k takes the PASCAL-VOC bit-interleaved colour of index k + 1, so no class is black
    (VOC index 0) and neighbouring labels get clearly different colours.
    """
    idx = np.arange(1, n + 1)
    colours = np.zeros((n, 3), dtype=np.int64)
    code = idx.copy()
    for shift in range(7, -1, -1):
        for channel in range(3):
            colours[:, channel] |= ((code >> channel) & 1) << shift
        code = code >> 3
    colours = colours.astype(np.uint8)
    if n > IGNORE_INDEX:
        colours[IGNORE_INDEX] = 0
    return colours


PALETTE = make_palette(256)


def colorize(mask: np.ndarray, palette: Optional[np.ndarray] = None) -> np.ndarray:
    """(H, W) integer labels -> (H, W, 3) uint8 colours (255 = black)."""
    pal = PALETTE if palette is None else np.asarray(palette, dtype=np.uint8)
    mask = _as_label_array(mask)
    return pal[mask]


def _as_label_array(mask) -> np.ndarray:
    try:  # a torch tensor without importing torch here
        mask = mask.detach().cpu().numpy()
    except AttributeError:
        pass
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be (H, W), got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"mask labels must lie in 0..255, got {mask.min()}..{mask.max()}")
    return mask.astype(np.uint8)


def save_mask_png(path: Union[str, Path], mask, palette: Optional[np.ndarray] = None) -> Path:
    """Write a palette ('P' mode) PNG: pixel values are the labels, shown in the palette's colours."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pal = PALETTE if palette is None else np.asarray(palette, dtype=np.uint8)
    full = np.zeros((256, 3), dtype=np.uint8)
    full[: len(pal)] = pal[:256]
    img = Image.fromarray(_as_label_array(mask))  # 'L'; putpalette turns it into 'P', values kept
    img.putpalette(full.reshape(-1).tolist())
    img.save(path)
    return path


def save_overlay_png(path: Union[str, Path], image_uint8, mask, alpha: float = 0.5,
                     palette: Optional[np.ndarray] = None) -> Path:
    """Blend the colour-coded mask over an (H, W, 3) uint8 RGB image; ignored pixels stay as they are."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    image = np.asarray(image_uint8)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got shape {image.shape} dtype {image.dtype}")
    mask = _as_label_array(mask)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape[:2]}")
    colours = colorize(mask, palette).astype(np.float32)
    blend = image.astype(np.float32) * (1 - alpha) + colours * alpha
    keep = (mask == IGNORE_INDEX)[..., None]
    out = np.where(keep, image.astype(np.float32), blend)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8)).save(path)
    return path

