"""vtab_data_path: images/s of the VTAB-1k data path with the decoded-image cache vs decoding JPEGs every epoch.

A fixture in the VTAB-1k layout (``<root>/dtd/images/<split>/000123.jpg`` plus
``train800.txt``, ``val200.txt``, ``train800val200.txt``, ``test.txt``) of generated
500x375 JPEGs is read through ``gapt.data.build_datasets`` twice: ``data.cache=memory``
(every split decoded and resized once into uint8) and ``data.cache=none`` (decode + TF
bilinear resize per item). An epoch reads every image of the three splits through a
DataLoader (batch 32, no worker processes) as the engine's loaders do. Steady-state epochs
are compared; the time to build the cache is reported separately.
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import os
import tempfile
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from benchmarks._common import Clock, Result, main_for, paired, quiet

NAME = "vtab_data_path"
TARGET = 5.0
TASK, TASK_CLASSES = "dtd", 47


def _picture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A photo-like uint8 image: smooth colour fields, a few edges, mild noise (JPEGs of realistic size)."""
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    picture = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    yy, xx = np.ogrid[0:height, 0:width]
    for _ in range(3):  # a few hard-edged discs
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(20, 90)
        picture[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, size=3)
    picture += rng.integers(-10, 11, size=picture.shape, dtype=np.int16)
    return np.clip(picture, 0, 255).astype(np.uint8)


def make_vtab_fixture(root: str, num_images: int = 200, size: Tuple[int, int] = (500, 375),
                      seed: int = 0) -> str:
    """Write ``num_images`` JPEGs and the four split lists under ``root/dtd``; returns the task folder.

    60% of the images are listed in train800.txt, 20% in val200.txt, 20% in test.txt.
    """
    rng = np.random.default_rng(seed)
    task = os.path.join(root, TASK)
    n_train = max(1, int(num_images * 0.6))
    n_val = max(1, int(num_images * 0.2))
    splits = {"train": range(0, n_train), "val": range(n_train, n_train + n_val),
              "test": range(n_train + n_val, num_images)}
    lines = {}
    for split, rows in splits.items():
        folder = os.path.join(task, "images", split)
        os.makedirs(folder, exist_ok=True)
        lines[split] = []
        for i in rows:
            rel = f"images/{split}/{i:06d}.jpg"
            Image.fromarray(_picture(rng, *size)).save(os.path.join(task, rel), quality=90)
            lines[split].append(f"{rel} {int(rng.integers(TASK_CLASSES))}\n")
    files = {"train800.txt": lines["train"], "val200.txt": lines["val"],
             "train800val200.txt": lines["train"] + lines["val"], "test.txt": lines["test"]}
    for name, content in files.items():
        with open(os.path.join(task, name), "w") as f:
            f.writelines(content)
    return task


def run(quick: bool = False, device: Optional[torch.device] = None, clock: Optional[Clock] = None,
        num_images: Optional[int] = None, image_size: int = 224, size: Tuple[int, int] = (500, 375),
        batch: int = 32, repeats: Optional[int] = None, **_) -> List[Result]:
    from gapt.config import DataConfig
    from gapt.data import build_datasets

    clock = clock or Clock("cpu")
    num_images = num_images or 200
    repeats = repeats or (3 if quick else 5)
    with tempfile.TemporaryDirectory(prefix="gapt-bench-vtab-") as root:
        make_vtab_fixture(root, num_images, size)
        bundles = {}

        def load(cache: str):
            def go():
                with quiet():
                    bundles[cache] = build_datasets(DataConfig(format="vtab", root=root, name=TASK, cache=cache,
                                                               num_workers=0), image_size=image_size)
            return go
        build_none_s = clock.time(load("none"))   # checks every image (draft decode), caches nothing
        build_memory_s = clock.time(load("memory"))  # decodes + resizes every image once
        first = [bundles[c].train[0][0] for c in ("none", "memory")]
        if not torch.equal(first[0], first[1]):
            raise AssertionError("cached and uncached items differ")

        def epoch(cache: str):
            b = bundles[cache]

            def go():
                for split in (b.train, b.val, b.test):
                    for _ in DataLoader(split, batch_size=batch, shuffle=False, num_workers=0):
                        pass
            return go
        t = paired(epoch("none"), epoch("memory"), repeats, clock)
    w, h = size
    detail = (f"{num_images / t.candidate_s:.0f} img/s cached vs {num_images / t.baseline_s:.0f} img/s decoding "
              f"(data.cache=memory vs none), VTAB-1k layout, {num_images} {w}x{h} JPEGs -> {image_size}x{image_size} "
              f"tf_bilinear, DataLoader batch {batch} in-process, {clock.describe()}, steady-state epochs, "
              f"{t.spread()}; cache build {build_memory_s:.2f}s ({num_images / max(build_memory_s, 1e-9):.0f} img/s, "
              f"{build_memory_s / max(t.baseline_s, 1e-9):.2f} uncached epochs; data.cache=none set-up "
              f"{build_none_s:.2f}s)")
    return [Result(NAME, t.ratio, detail, TARGET, extra={"timing": t, "build_s": build_memory_s})]


def _args(p):
    p.add_argument("--num-images", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)


if __name__ == "__main__":
    main_for(run, __doc__.splitlines()[0], _args)
