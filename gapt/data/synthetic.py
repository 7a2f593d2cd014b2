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
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

RENDER_SIZE = 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SHAPE_NAMES = ("circle", "square", "triangle", "plus", "ring")
_BAR = len(SHAPE_NAMES)          # kind id of the elongated bar (orientation task only)
_ABSENT = -1

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

from gapt.data.bundle import DatasetBundle


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------

def _sdf_circle(u, v, r, aspect):
    return np.hypot(u, v) - r


def _sdf_square(u, v, r, aspect):
    return np.maximum(np.abs(u), np.abs(v)) - 0.82 * r


_TRI_NORMALS = np.array([[np.cos(a), np.sin(a)] for a in np.deg2rad([90.0, 210.0, 330.0])],
                        dtype=np.float32)


def _sdf_triangle(u, v, r, aspect):
    # Equilateral triangle as the intersection of three half-planes (inradius r / 2).
    d = u * _TRI_NORMALS[0, 0] + v * _TRI_NORMALS[0, 1]
    for nx, ny in _TRI_NORMALS[1:]:
        d = np.maximum(d, u * nx + v * ny)
    return d - 0.5 * r


def _sdf_plus(u, v, r, aspect):
    au, av = np.abs(u), np.abs(v)
    arm = 0.34 * r
    return np.minimum(np.maximum(au - r, av - arm), np.maximum(au - arm, av - r))


def _sdf_ring(u, v, r, aspect):
    return np.abs(np.hypot(u, v) - 0.72 * r) - 0.3 * r


def _sdf_bar(u, v, r, aspect):
    return np.maximum(np.abs(u) - r, np.abs(v) - r * aspect)


_SDF: Tuple[Callable, ...] = (_sdf_circle, _sdf_square, _sdf_triangle, _sdf_plus, _sdf_ring, _sdf_bar)


@dataclass
class _Scenes:
    """Object slots of a batch of scenes; slot k of every image is drawn in one pass.

    Arrays are (N, K); ``kind`` -1 marks an empty slot. Later slots are drawn on top.
    ``base`` (N, 3) is the background colour the blotchy background varies around; object
    colours are chosen against it.
    """
    kind: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    radius: np.ndarray
    angle: np.ndarray            # radians
    aspect: np.ndarray           # bar half-width / half-length
    colour: np.ndarray           # (N, K, 3) in 0..255
    base: np.ndarray             # (N, 3) in 0..255

    @classmethod
    def empty(cls, rng: np.random.Generator, n: int, k: int) -> "_Scenes":
        z = lambda: np.zeros((n, k), np.float32)  # noqa: E731
        base = rng.uniform(30.0, 225.0, (n, 3)).astype(np.float32)
        return cls(np.full((n, k), _ABSENT, np.int64), z(), z(), z(), z(), z(),
                   np.zeros((n, k, 3), np.float32), base)


def _interp_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) bilinear interpolation weights, align_corners=False."""
    pos = (np.arange(dst) + 0.5) * src / dst - 0.5
    pos = np.clip(pos, 0, src - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, src - 1)
    w = pos - lo
    m = np.zeros((dst, src), np.float32)
    m[np.arange(dst), lo] += 1 - w
    m[np.arange(dst), hi] += w
    return m


def _backgrounds(rng: np.random.Generator, base: np.ndarray, size: int) -> np.ndarray:
    """Low-frequency colour blotches around each base colour: (N, H, W, 3) float32."""
    n = base.shape[0]
    amp = rng.uniform(8.0, 35.0, (n, 1, 1, 1)).astype(np.float32)
    grid = base[:, None, None, :] + amp * rng.standard_normal((n, 4, 4, 3)).astype(np.float32)
    w = _interp_matrix(4, size)
    return np.einsum("hi,nijc,wj->nhwc", w, grid, w, optimize=True).astype(np.float32)


def _contrasting_colours(rng: np.random.Generator, base: np.ndarray, k: int) -> np.ndarray:
    """Random object colours, pushed away from the background base colour when too close."""
    n = base.shape[0]
    col = rng.uniform(0.0, 255.0, (n, k, 3)).astype(np.float32)
    too_close = np.linalg.norm(col - base[:, None, :], axis=-1) < 100.0
    flipped = np.mod(base[:, None, :] + 128.0 + rng.uniform(-30, 30, (n, k, 3)), 256.0)
    return np.where(too_close[..., None], flipped, col).astype(np.float32)


def _render(rng: np.random.Generator, scenes: _Scenes, size: int = RENDER_SIZE,
            noise: Tuple[float, float] = (2.0, 10.0)) -> np.ndarray:
    """Draw the scenes over random backgrounds, add pixel noise -> uint8 (N, H, W, 3)."""
    n, k = scenes.kind.shape
    img = _backgrounds(rng, scenes.base, size)
    coords = np.arange(size, dtype=np.float32) + 0.5
    xs, ys = coords[None, None, :], coords[None, :, None]
    for slot in range(k):
        idx = np.nonzero(scenes.kind[:, slot] != _ABSENT)[0]
        if idx.size == 0:
            continue
        col = lambda a: a[idx, slot][:, None, None]  # noqa: E731
        dx, dy = xs - col(scenes.cx), ys - col(scenes.cy)
        cos, sin = np.cos(col(scenes.angle)), np.sin(col(scenes.angle))
        u = cos * dx + sin * dy
        v = -sin * dx + cos * dy
        kinds = scenes.kind[idx, slot]
        sdf = np.empty((idx.size, size, size), np.float32)
        for kind in np.unique(kinds):
            m = kinds == kind
            sdf[m] = _SDF[kind](u[m], v[m], col(scenes.radius)[m], col(scenes.aspect)[m])
        alpha = np.clip(0.5 - sdf, 0.0, 1.0)[..., None]
        colour = scenes.colour[idx, slot][:, None, None, :]
        img[idx] = img[idx] * (1.0 - alpha) + alpha * colour
    sigma = rng.uniform(noise[0], noise[1], (n, 1, 1, 1)).astype(np.float32)
    img += sigma * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    return labels


def _cells(rng: np.random.Generator, n: int, grid: int, k: int) -> np.ndarray:
    """k distinct cells of a grid x grid board per image (row-major ids), shape (N, k)."""
    return np.argsort(rng.random((n, grid * grid)), axis=1)[:, :k]


def _place_in_cells(rng, scenes: _Scenes, slots, cells: np.ndarray, grid: int,
                    radius: np.ndarray, size: int) -> None:
    """Centre objects in their cells with as much jitter as the cell leaves free."""
    cell = size / grid
    free = np.maximum(cell / 2 - radius - 0.5, 0.0)
    jitter = lambda: rng.uniform(-1.0, 1.0, cells.shape).astype(np.float32) * free  # noqa: E731
    scenes.cx[:, slots] = (cells % grid + 0.5) * cell + jitter()
    scenes.cy[:, slots] = (cells // grid + 0.5) * cell + jitter()
    scenes.radius[:, slots] = radius


def _scatter(rng, scenes: _Scenes, slots, present: np.ndarray, kinds_from, r_range, size) -> None:
    """Objects at uniform random positions in the image; they may overlap others (clutter)."""
    n, k = present.shape
    kinds = rng.choice(np.asarray(kinds_from), (n, k))
    scenes.kind[:, slots] = np.where(present, kinds, _ABSENT)
    r = rng.uniform(*r_range, (n, k)).astype(np.float32)
    scenes.radius[:, slots] = r
    scenes.cx[:, slots] = rng.uniform(r + 0.5, size - r - 0.5)
    scenes.cy[:, slots] = rng.uniform(r + 0.5, size - r - 0.5)
    scenes.angle[:, slots] = rng.uniform(0, 2 * np.pi, (n, k))


def _random_kinds(rng, n: int, k: int, kinds=range(len(SHAPE_NAMES))) -> np.ndarray:
    return rng.choice(np.asarray(list(kinds)), (n, k))


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
