"""protocol: a whole short run with gapt's protocol vs the reference protocol's test-every-epoch cost.

Both are complete ``gapt.engine.trainer.train`` runs (data, model, train, val every epoch,
run folder, test at the end on the best-val and the last state); the reference protocol adds
``train.eval_test_every_epoch=true`` (SPEC §6: the reference evaluates test after every
epoch). Tiny setting: generated ``shapes``/``count`` data (train N, val N/4, test N/2: test
larger than val, as in FGVC and VTAB-1k), ``mae_vit_micro`` with random weights at 32x32.
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import itertools
import os
import tempfile
from typing import List, Optional

import torch

from benchmarks._common import Clock, Result, main_for, paired, quiet, resolve_device

NAME = "protocol"


def run(quick: bool = False, device: Optional[torch.device] = None, clock: Optional[Clock] = None,
        backbone: str = "mae_vit_micro", epochs: Optional[int] = None, num_samples: Optional[int] = None,
        num_prompts: int = 10, image_size: int = 32, batch: int = 64, repeats: Optional[int] = None,
        **_) -> List[Result]:
    from gapt.config import load_config
    from gapt.data.synthetic import split_sizes
    from gapt.engine.trainer import train

    device = device or resolve_device()
    clock = clock or Clock("cpu", device)
    epochs = epochs or (3 if quick else 10)
    num_samples = num_samples or (200 if quick else 500)
    repeats = repeats or 2
    sizes = split_sizes(num_samples)
    counter = itertools.count()
    with tempfile.TemporaryDirectory(prefix="gapt-bench-protocol-") as root:
        def one_run(test_every_epoch: bool):
            def go():
                cfg = load_config(overrides=[
                    "data.format=shapes", "data.name=count", f"data.num_samples={num_samples}", "data.num_workers=0",
                    f"backbone={backbone}", "weights=null", f"image_size={image_size}", "method=gated",
                    f"num_prompts={num_prompts}", f"train.epochs={epochs}", "train.warmup_epochs=1",
                    f"train.batch_size={batch}", f"train.eval_test_every_epoch={str(test_every_epoch).lower()}",
                    f"device={device.type}", f"out={os.path.join(root, f'run{next(counter)}')}"])
                with quiet():
                    train(cfg)
            return go
        t = paired(one_run(True), one_run(False), repeats, clock, warmup=0 if quick else 1)
    detail = (f"whole run: {epochs} epochs of train + val, test once at the end (gapt) vs test every epoch too "
              f"(train.eval_test_every_epoch=true); shapes/count train {sizes['train']} / val {sizes['val']} / "
              f"test {sizes['test']}, {backbone} (random weights) {image_size}px, gated, {num_prompts} prompts, "
              f"batch {batch}, {clock.describe()}: {t.baseline_s:.2f}s -> {t.candidate_s:.2f}s per run, {t.spread()}")
    return [Result(NAME, t.ratio, detail, extra={"timing": t})]


def _args(p):
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)


if __name__ == "__main__":
    main_for(run, __doc__.splitlines()[0], _args)
