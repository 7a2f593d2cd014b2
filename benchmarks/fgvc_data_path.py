"""fgvc_data_path: training images/s of an augmented FGVC split with ``data.cache_augmented=true`` vs decoding every epoch.

A fixture in the FGVC (VPT JSON) layout of generated JPEGs of mixed sizes around CUB's
(500x375, 375x500, 500x333, 460x500) is read through ``gapt.data.build_datasets`` twice:
``data.cache_augmented=true`` (each image decoded and resized to shorter side 256 once; the
random crop 224 and the flip drawn per access) and the default (decode + resize + crop + flip
per access). An epoch reads the train split through a DataLoader (batch 32, no worker
processes). Both give the same tensors for the same seed (checked before timing). The time
to build the cache is reported separately.
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import json
import os
import tempfile
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from benchmarks._common import Clock, Result, main_for, paired, quiet
from benchmarks.vtab_data_path import _picture

NAME = "fgvc_data_path"
SIZES = ((500, 375), (375, 500), (500, 333), (460, 500))


def make_fgvc_fixture(root: str, num_images: int = 200, sizes: Sequence[Tuple[int, int]] = SIZES,
                      num_classes: int = 10, seed: int = 0) -> str:
    """``num_images`` train JPEGs (and a few val/test ones) with train.json / val.json / test.json."""
    rng = np.random.default_rng(seed)
    splits = {"train": {}, "val": {}, "test": {}}
    for i in range(num_images + 4):
        rel = f"c{i % num_classes:02d}/{i:06d}.jpg"
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        Image.fromarray(_picture(rng, *sizes[i % len(sizes)])).save(os.path.join(root, rel), quality=90)
        split = "train" if i < num_images else ("val" if i < num_images + 2 else "test")
        splits[split][rel] = i % num_classes
    for split, entries in splits.items():
        with open(os.path.join(root, f"{split}.json"), "w") as f:
            json.dump(entries, f)
    return root


def run(quick: bool = False, device: Optional[torch.device] = None, clock: Optional[Clock] = None,
        num_images: Optional[int] = None, image_size: int = 224, batch: int = 32, repeats: Optional[int] = None,
        **_) -> List[Result]:
    from gapt.config import DataConfig
    from gapt.data import build_datasets

    clock = clock or Clock("cpu")
    num_images = num_images or (100 if quick else 200)
    repeats = repeats or (3 if quick else 5)
    with tempfile.TemporaryDirectory(prefix="gapt-bench-fgvc-") as root:
        make_fgvc_fixture(root, num_images)
        bundles = {}

        def load(cached: bool):
            def go():
                with quiet():
                    bundles[cached] = build_datasets(DataConfig(format="fgvc", root=root, cache="memory",
                                                                cache_augmented=cached, num_workers=0),
                                                     image_size=image_size)
            return go
        clock.time(load(False))
        build_s = clock.time(load(True))
        items = []
        for cached in (False, True):
            torch.manual_seed(0)
            items.append([bundles[cached].train[i][0] for i in range(4)])
        if not all(torch.equal(a, b) for a, b in zip(*items)):
            raise AssertionError("cached and uncached augmented items differ")

        def epoch(cached: bool):
            def go():
                for _ in DataLoader(bundles[cached].train, batch_size=batch, shuffle=True, num_workers=0):
                    pass
            return go
        t = paired(epoch(False), epoch(True), repeats, clock)
    sizes = ", ".join(f"{w}x{h}" for w, h in SIZES)
    detail = (f"{num_images / t.candidate_s:.0f} img/s cached vs {num_images / t.baseline_s:.0f} img/s decoding "
              f"(data.cache_augmented=true vs false), FGVC train split, {num_images} JPEGs ({sizes}) -> resize "
              f"{image_size * 8 // 7} + random crop {image_size} + flip, DataLoader batch {batch} in-process, "
              f"{clock.describe()}, {t.spread()}; cache build {build_s:.2f}s "
              f"({build_s / max(t.baseline_s, 1e-9):.2f} uncached epochs)")
    return [Result(NAME, t.ratio, detail, extra={"timing": t, "build_s": build_s})]


def _args(p):
    p.add_argument("--num-images", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)


if __name__ == "__main__":
    main_for(run, __doc__.splitlines()[0], _args)
