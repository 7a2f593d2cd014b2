"""prompt_init: one training epoch's time over each data-driven prompt init's (SPT, VIPAMIN, k-means prototypes).

Each line is ``prompt_init_<init>: X.XXx`` with X = (one training epoch's time) / (the init's time) on the
same images and model, as every benchmark here divides the baseline's time by the candidate's: the init
costs 1/X epochs of the run it starts (a VTAB-1k run is 100 epochs of 1000 images), e.g. 4.00x = a quarter
of an epoch. The epoch is measured as the median of a few training steps
(forward, cross-entropy, backward, AdamW over the tuned tensors; batch 32) times the epoch's steps, in this
process, with the same clock. Inits, each on a random backbone (one seed) and random images:

    spt_shallow     vpt-shallow, SPT's sampler on the whole train set resampled (MAE's rule): patch_embed only
    spt_deep        vpt-deep, the same through every block but the last
    vipamin         vpt-shallow, matching + orthogonal on one batch of min(256, n) images (k = 8, lambda = 0.5)
    vipamin_deep    vpt-deep, the same at every block (the random-prompt VPT-deep pass beside the prompt-free one)
    prototype_deep  vpt-deep, k-means (k-means++, <= 50 Lloyd steps) of 256 images' tokens at every block

Sizes: the micro ViT (``mae_vit_micro``: 6 blocks, width 64, 32 px, 64 patches; 100 / 20 prompts) on 1000
images (``--quick``: 64); ``--vitb16`` adds ViT-B/16 at 224 px (100 / 20 prompts) on ``--images`` images
(default 256; SPT then resamples 256, VIPAMIN's batch is 256): minutes on a CPU, seconds on a GPU.
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import math
import statistics
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from benchmarks._common import Clock, Result, build, main_for, quiet, resolve_device, vit_name

NAME = "prompt_init"
MICRO, VITB = "mae_vit_micro", "mae_vitb16"
BATCH = 32
# label -> (method, prompt_init)
INITS = {"spt_shallow": ("vpt-shallow", "spt"), "spt_deep": ("vpt-deep", "spt"),
         "vipamin": ("vpt-shallow", "vipamin"), "vipamin_deep": ("vpt-deep", "vipamin"),
         "prototype_deep": ("vpt-deep", "prototype")}


def _init_fn(init: str, model, data, device) -> Callable[[], object]:
    from gapt.engine.prompt_init import init_prompts_spt, init_prompts_vipamin
    from gapt.engine.prototype import init_prompts_from_prototypes
    if init == "spt":
        return lambda: init_prompts_spt(model, data, seed=42, device=device)
    if init == "vipamin":
        return lambda: init_prompts_vipamin(model, data, k=8, lam=0.5, device=device)
    return lambda: init_prompts_from_prototypes(model, data, seed=42, device=device)


def _epoch_time(model, data, device, clock: Clock, steps: int) -> float:
    """One epoch over ``data``: the median training step (batch 32) times the epoch's steps."""
    opt = torch.optim.AdamW(list(model.tuned_parameters().values()), lr=1e-4, weight_decay=0.01)
    x, y = data.tensors[0][:BATCH].to(device), data.tensors[1][:BATCH].to(device)
    model.train()

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    times = [clock.time(step) for _ in range(steps)]
    model.eval()
    return statistics.median(times) * math.ceil(len(data) / BATCH)


def run(quick: bool = False, device: Optional[torch.device] = None, clock: Optional[Clock] = None,
        vitb16: bool = False, images: Optional[int] = None) -> List[Result]:
    device = device or resolve_device()
    clock = clock or Clock("cpu", device)
    sizes = [(MICRO, 32, 64 if quick else 1000)]
    if vitb16:
        sizes.append((VITB, 224, images or (32 if quick else 256)))
    results = []
    for backbone, size, n in sizes:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.arange(n) % 10)
        for label, (method, init) in INITS.items():
            prompts = 20 if method == "vpt-deep" else 100
            model = build(backbone, method=method, num_prompts=prompts, num_classes=10, image_size=size).to(device)
            try:
                with quiet():
                    fn = _init_fn(init, model, data, device)
                    t_init = statistics.median(clock.time(fn) for _ in range(1 if n > 256 else 2))
                t_epoch = _epoch_time(model, data, device, clock, 2 if quick else 4)
            except Exception as e:  # one init failing must not hide the others' lines
                results.append(Result(f"{NAME}_{label}", None, f"{type(e).__name__}: {e}", failed=True))
                continue
            results.append(Result(
                f"{NAME}_{label}", t_epoch / t_init,
                f"one training epoch / the init: epoch {t_epoch:.3g} s, init {t_init:.3g} s = {t_init / t_epoch:.3g} "
                f"epochs ({n} images, batch {BATCH}); "
                f"{method}, {prompts} prompts, {vit_name(model)}, {clock.describe()}",
                extra={"init_s": t_init, "epoch_s": t_epoch, "images": n}))
    return results


def _args(p) -> None:
    p.add_argument("--vitb16", action="store_true", help="also ViT-B/16 at 224 px (minutes on a CPU)")
    p.add_argument("--images", type=int, default=None, help="ViT-B/16 images (default 256; --quick: 32)")


if __name__ == "__main__":
    main_for(run, __doc__.splitlines()[0], _args)
