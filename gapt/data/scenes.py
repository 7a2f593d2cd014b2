"""Scenes of the procedural tasks (:mod:`.synthetic`): a blotchy, noisy background plus anti-aliased
shapes from signed distance functions, rendered with numpy for a whole split at once."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Tuple

import numpy as np

RENDER_SIZE = 32
SHAPE_NAMES = ("circle", "square", "triangle", "plus", "ring")
_BAR = len(SHAPE_NAMES)          # kind id of the elongated bar (orientation task only)
_ABSENT = -1


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
