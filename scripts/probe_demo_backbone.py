#!/usr/bin/env python
"""Linear probes of demo backbones: how much each encoder's frozen features say about the tasks.

    python scripts/probe_demo_backbone.py gapt/demo/assets/mae_vit_micro.safetensors other.safetensors
    python scripts/probe_demo_backbone.py --random gapt/demo/assets/mae_vit_micro.safetensors

For every file and every procedural task (count, location, orientation, shape; seed 0; 2000
train / 500 val / the first 1000 test images): features are MAE's pooling (mean over the
non-CLS tokens, then the final LayerNorm), standardised with the train mean/std; a logistic
regression (Adam, lr 0.01, 500 full-batch steps) is fit for each weight decay in
{1e-4, 1e-3, 1e-2}; the one with the best val top-1 gives the test top-1 printed. ``--random``
adds a row for the same architecture with timm's random initialisation (seed 0). Prints a
Markdown table (the one in gapt/demo/assets/README.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gapt.config import DataConfig  # noqa: E402
from gapt.data.synthetic import SYNTHETIC_TASKS, build_synthetic_bundle  # noqa: E402

TASKS = ("count", "location", "orientation", "shape")
WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2)


def encoder(path: Path, random_init: bool = False):
    from safetensors import safe_open
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer
    with safe_open(str(path), framework="pt") as f:
        arch = json.loads(f.metadata()["architecture"])
    eps = arch.pop("norm_eps")
    torch.manual_seed(0)
    model = VisionTransformer(norm_layer=partial(nn.LayerNorm, eps=eps), **arch)
    if not random_init:
        model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


@torch.no_grad()
def features(model, images: torch.Tensor) -> torch.Tensor:
    out = []
    for chunk in images.split(500):
        # by hand, because timm's forward_features applies the final norm to every token first
        x = model.patch_embed(chunk)
        x = torch.cat([model.cls_token.expand(len(x), -1, -1), x], 1) + model.pos_embed
        x = model.blocks(x)
        out.append(model.norm(x[:, 1:].mean(1)))
    return torch.cat(out)


def probe(train, val, test, num_classes: int) -> float:
    (ftr, ytr), (fva, yva), (fte, yte) = train, val, test
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fva, fte = [(f - mu) / sd for f in (ftr, fva, fte)]
    best = None
    for wd in WEIGHT_DECAYS:
        torch.manual_seed(0)
        head = nn.Linear(ftr.shape[1], num_classes)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=wd)
        for _ in range(500):
            opt.zero_grad()
            nn.functional.cross_entropy(head(ftr), ytr).backward()
            opt.step()
        with torch.no_grad():
            val_top1 = (head(fva).argmax(1) == yva).float().mean().item()
            test_top1 = (head(fte).argmax(1) == yte).float().mean().item()
        if best is None or val_top1 > best[0]:
            best = (val_top1, test_top1)
    return 100 * best[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--random", action="store_true", help="add the same architecture, randomly initialised")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = {}
    for task in TASKS:
        b = build_synthetic_bundle(DataConfig(format="shapes", name=task, num_samples=2000), 32, 0)
        (xte, yte) = b.test.tensors()
        data[task] = (b.train.tensors(), b.val.tensors(), (xte[:1000], yte[:1000]))
    rows = [(str(p), encoder(p)) for p in args.files]
    if args.random:
        rows.append(("random init", encoder(args.files[0], random_init=True)))
    print("| encoder | " + " | ".join(f"{t} ({SYNTHETIC_TASKS[t]}, {100 / SYNTHETIC_TASKS[t]:.1f}%)" for t in TASKS)
          + " |")
    print("|---|" + "---:|" * len(TASKS))
    for name, model in rows:
        cells = []
        for task in TASKS:
            splits = [(features(model, x), y) for x, y in data[task]]
            cells.append(f"{probe(*splits, SYNTHETIC_TASKS[task]):.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
