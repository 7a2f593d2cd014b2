"""Procedural image tasks in the spirit of VTAB's structured group, for offline demos and tests.

Every image is a 32x32 RGB scene rendered with numpy: a blotchy, noisy background plus a few
anti-aliased shapes drawn from signed distance functions. Labels depend on the *structure*
of the scene (how many objects, where the target is, how a bar is tilted, which shape the
large object has), while colours, sizes, positions, distractors and noise are random, so a
linear probe on random features does not solve them.

Rendering is vectorised over the whole split (one numpy pass per object slot), so a split of
a few thousand images takes well under a second. Everything is a pure function of the seed.

Tasks (name -> classes):

- ``count``        1..6 objects of mixed shapes and colours -> 6 classes (like clevr_count)
- ``location``     which cell of a 3x3 grid holds the "plus" among other shapes -> 9 classes
                   (like dsprites_loc)
- ``orientation``  angle bin of a long bar (0..180 deg in 8 bins), small distractors around
                   -> 8 classes (like dsprites_ori / smallnorb_azi)
- ``shape``        shape of the large object (circle, square, triangle, plus, ring) among
                   small distractors -> 5 classes
"""
from __future__ import annotations

import zlib
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .bundle import DatasetBundle
from .scenes import (
    _ABSENT,
    _BAR,
    RENDER_SIZE,
    SHAPE_NAMES,
    _balanced_labels,
    _cells,
    _contrasting_colours,
    _place_in_cells,
    _random_kinds,
    _render,
    _scatter,
    _Scenes,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SYNTHETIC_TASKS: Dict[str, int] = {
    "count": 6,
    "location": 9,
    "orientation": 8,
    "shape": len(SHAPE_NAMES),
}

_ORIENTATION_BIN_DEG = 180.0 / SYNTHETIC_TASKS["orientation"]
_SPLITS = ("train", "val", "test")
_DEFAULT_NUM_TRAIN = 2000
_MIN_EVAL_SAMPLES = 50

# --------------------------------------------------------------------------------------
# Tasks: each builder lays out (scenes, labels) for n images; _render draws them
# --------------------------------------------------------------------------------------

def _task_count(rng: np.random.Generator, n: int, size: int = RENDER_SIZE):
    max_objects, grid = SYNTHETIC_TASKS["count"], 4
    labels = _balanced_labels(rng, n, max_objects)
    scenes = _Scenes.empty(rng, n, max_objects)
    slots = list(range(max_objects))
    radius = rng.uniform(1.8, 3.6, (n, max_objects)).astype(np.float32)
    _place_in_cells(rng, scenes, slots, _cells(rng, n, grid, max_objects), grid, radius, size)
    present = np.arange(max_objects)[None, :] <= labels[:, None]
    scenes.kind[:] = np.where(present, _random_kinds(rng, n, max_objects), _ABSENT)
    scenes.angle[:] = rng.uniform(0, 2 * np.pi, (n, max_objects))
    scenes.colour[:] = _contrasting_colours(rng, scenes.base, max_objects)
    return scenes, labels

def _task_location(rng: np.random.Generator, n: int, size: int = RENDER_SIZE):
    grid = 3
    labels = _balanced_labels(rng, n, grid * grid)
    num_distractors = 3
    k = num_distractors + 1
    # The target cell is the label; distractors take other cells, some slots left empty.
    others = np.argsort(rng.random((n, grid * grid)) + (np.arange(grid * grid)[None] == labels[:, None]),
                        axis=1)[:, :num_distractors]
    cells = np.concatenate([others, labels[:, None]], axis=1)
    scenes = _Scenes.empty(rng, n, k)
    radius = rng.uniform(2.4, 3.8, (n, k)).astype(np.float32)
    _place_in_cells(rng, scenes, list(range(k)), cells, grid, radius, size)
    present = rng.random((n, num_distractors)) < 0.5
    distractor_kinds = _random_kinds(rng, n, num_distractors, kinds=(0, 1, 2, 4))
    scenes.kind[:, :num_distractors] = np.where(present, distractor_kinds, _ABSENT)
    scenes.kind[:, -1] = SHAPE_NAMES.index("plus")
    scenes.angle[:] = rng.uniform(0, 2 * np.pi, (n, k))
    scenes.angle[:, -1] = rng.uniform(-0.35, 0.35, n)   # the plus stays roughly upright
    scenes.colour[:] = _contrasting_colours(rng, scenes.base, k)
    return scenes, labels

def _task_orientation(rng: np.random.Generator, n: int, size: int = RENDER_SIZE):
    bins = SYNTHETIC_TASKS["orientation"]
    labels = _balanced_labels(rng, n, bins)
    num_distractors = 3
    k = num_distractors + 1
    scenes = _Scenes.empty(rng, n, k)
    slots = list(range(num_distractors))
    _scatter(rng, scenes, slots, rng.random((n, num_distractors)) < 0.5, (0, 1, 2, 4), (1.2, 2.4), size)
    half_length = rng.uniform(7.0, 11.0, n).astype(np.float32)
    angle_deg = (labels + rng.random(n)) * _ORIENTATION_BIN_DEG
    scenes.kind[:, -1] = _BAR
    scenes.radius[:, -1] = half_length
    scenes.aspect[:, -1] = rng.uniform(1.1, 1.8, n) / half_length   # 2.2..3.6 px wide
    scenes.angle[:, -1] = np.deg2rad(angle_deg)
    margin = half_length * 0.5 + 2.0
    scenes.cx[:, -1] = rng.uniform(margin, size - margin)
    scenes.cy[:, -1] = rng.uniform(margin, size - margin)
    scenes.colour[:] = _contrasting_colours(rng, scenes.base, k)
    return scenes, labels

def _task_shape(rng: np.random.Generator, n: int, size: int = RENDER_SIZE):
    labels = _balanced_labels(rng, n, len(SHAPE_NAMES))
    num_distractors = 5
    k = num_distractors + 1
    scenes = _Scenes.empty(rng, n, k)
    _scatter(rng, scenes, list(range(num_distractors)), rng.random((n, num_distractors)) < 0.7,
             range(len(SHAPE_NAMES)), (1.2, 2.4), size)
    r = rng.uniform(4.5, 8.0, n).astype(np.float32)
    scenes.kind[:, -1] = labels
    scenes.radius[:, -1] = r
    scenes.angle[:, -1] = rng.uniform(0, 2 * np.pi, n)
    scenes.cx[:, -1] = rng.uniform(r + 1, size - r - 1)
    scenes.cy[:, -1] = rng.uniform(r + 1, size - r - 1)
    scenes.colour[:] = _contrasting_colours(rng, scenes.base, k)
    return scenes, labels

def _random_scenes(rng: np.random.Generator, n: int, size: int = RENDER_SIZE):
    """Unstructured scenes for pre-training: 0..8 objects of any kind, size and angle."""
    k = 8
    scenes = _Scenes.empty(rng, n, k)
    present = np.arange(k)[None, :] < rng.integers(0, k + 1, (n, 1))
    _scatter(rng, scenes, list(range(k)), present, range(len(SHAPE_NAMES) + 1), (1.2, 7.0), size)
    bars = scenes.kind == _BAR
    scenes.aspect[:] = np.where(bars, rng.uniform(0.12, 0.35, (n, k)), 0.0)
    scenes.colour[:] = _contrasting_colours(rng, scenes.base, k)
    return scenes, np.zeros(n, np.int64)

_TASK_BUILDERS = {
    "count": _task_count,
    "location": _task_location,
    "orientation": _task_orientation,
    "shape": _task_shape,
}

def _class_names(task: str) -> List[str]:
    if task == "count":
        return [f"{i} object{'s' if i > 1 else ''}" for i in range(1, SYNTHETIC_TASKS["count"] + 1)]
    if task == "location":
        rows, cols = ("top", "middle", "bottom"), ("left", "centre", "right")
        return [f"{r}-{c}" for r in rows for c in cols]
    if task == "orientation":
        w = _ORIENTATION_BIN_DEG
        return [f"{i * w:g}-{(i + 1) * w:g} deg" for i in range(SYNTHETIC_TASKS["orientation"])]
    return list(SHAPE_NAMES)

def _check_task(task: str) -> None:
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; valid tasks: {', '.join(SYNTHETIC_TASKS)}")

def _split_rng(seed: int, task: str, split: str) -> np.random.Generator:
    # One independent stream per (seed, task, split): splits never share a scene.
    return np.random.default_rng(
        np.random.SeedSequence([int(seed), zlib.crc32(task.encode()), _SPLITS.index(split) + 1]))

def generate_task(task: str, n: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Render ``n`` labelled images of ``task``: uint8 (N, 32, 32, 3) and int64 labels (N,).

    Classes are balanced exactly (each appears n // C or n // C + 1 times).
    """
    _check_task(task)
    scenes, labels = _TASK_BUILDERS[task](rng, n)
    return _render(rng, scenes), labels.astype(np.int64)

def generate_unlabelled(n: int, seed: int, chunk: int = 4096) -> np.ndarray:
    """Unlabelled pre-training images, uint8 (N, 32, 32, 3): a seeded mix of every task's
    scenes and unstructured random scenes (one fifth each)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(b"unlabelled")]))
    builders = list(_TASK_BUILDERS.values()) + [_random_scenes]
    out = np.empty((n, RENDER_SIZE, RENDER_SIZE, 3), np.uint8)
    which = rng.integers(0, len(builders), n)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        for b, build in enumerate(builders):
            idx = start + np.nonzero(which[start:stop] == b)[0]
            if idx.size:
                scenes, _ = build(rng, idx.size)
                out[idx] = _render(rng, scenes)
    return out

def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 3, size, size) uint8, bilinear with antialiasing."""
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False,
                      antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8)

class SyntheticImageDataset(torch.utils.data.Dataset):
    """A rendered split kept as uint8 (N, 3, H, W); items are normalised on access.

    Items are ``(float32 CHW tensor normalised with ImageNet mean/std, int label)``.
    ``tensors()`` returns the whole split at once, which is much faster for small models.
    """

    augmented = False

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: List[str]):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError("images must be uint8 (N, 3, H, W)")
        if labels.shape[0] != images.shape[0]:
            raise ValueError("images and labels differ in length")
        self.images = images
        self.labels = labels.long()
        self.classes = list(class_names)
        self.augmented = False
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        x = self.images[index].float().div_(255.0)
        return (x - self._mean) / self._std, int(self.labels[index])

    @property
    def targets(self) -> List[int]:
        return self.labels.tolist()

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.images.float().div_(255.0)
        return (x - self._mean) / self._std, self.labels.clone()

def split_sizes(num_samples: int) -> Dict[str, int]:
    n_train = int(num_samples) if num_samples and num_samples > 0 else _DEFAULT_NUM_TRAIN
    return {"train": n_train,
            "val": max(_MIN_EVAL_SAMPLES, n_train // 4),
            "test": max(_MIN_EVAL_SAMPLES, n_train // 2)}

def build_synthetic_bundle(cfg_data, image_size: int, seed: int) -> DatasetBundle:
    """Render the train/val/test splits of ``cfg_data.name`` (see SYNTHETIC_TASKS).

    ``cfg_data.num_samples`` sets the train size (0 = 2000); val and test get a quarter and a
    half of it (at least 50 each). Each split comes from its own seed stream, so the same
    ``seed`` always gives the same images and the splits never overlap. ``cfg_data.final``
    is ignored: the splits are fixed.
    """
    task = cfg_data.name
    _check_task(task)
    sizes = split_sizes(getattr(cfg_data, "num_samples", 0))
    class_names = _class_names(task)
    datasets = {}
    for split in _SPLITS:
        images, labels = generate_task(task, sizes[split], _split_rng(seed, task, split))
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        if image_size != RENDER_SIZE:
            x = _resize_uint8(x, image_size)
        datasets[split] = SyntheticImageDataset(x, torch.from_numpy(labels), class_names)
    resize = (f"rendered at {RENDER_SIZE}x{RENDER_SIZE}" if image_size == RENDER_SIZE else
              f"rendered at {RENDER_SIZE}x{RENDER_SIZE}, resized to {image_size}x{image_size} "
              "(bilinear, antialias)")
    info = {
        "format": "shapes",
        "name": task,
        "root": "",
        "splits": {s: f"{s} ({sizes[s]} generated)" for s in _SPLITS},
        "source": f"procedural (gapt.data.synthetic, seed {seed})",
        "resize": resize,
        "normalisation": "imagenet mean/std",
        "num_train": sizes["train"],
        "num_val": sizes["val"],
        "num_test": sizes["test"],
        "skipped_images": 0,
        "num_classes": SYNTHETIC_TASKS[task],
        "class_names": list(class_names),
        "image_size": int(image_size),
        "train_augmented": False,
        "cache": "memory",
        "notes": [],
    }
    return DatasetBundle(train=datasets["train"], val=datasets["val"], test=datasets["test"],
                         num_classes=SYNTHETIC_TASKS[task], class_names=class_names, info=info)
