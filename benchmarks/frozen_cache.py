"""frozen_cache: training epochs of the insertion sweep (vpt-at-block k) from the cached output of the frozen leading blocks vs all blocks.

Blocks 1..k-1 see no trainable tensor when prompts enter at block k, so on un-augmented data
the engine computes their output once (``model.frozen_features``, via the engine's
``precompute_frozen``) and trains from it (``model.forward_from_frozen``). Here both paths
run the engine's own ``train_one_epoch`` over the same images; the cache build is timed
separately. The target printed beside the ratio is (L / (L-k+1)) x 0.8.

Why the target is out of reach for *training* epochs: the k-1 skipped blocks run forward
only (nothing before block k needs a gradient) and without prompts, while the L-k+1 blocks
both paths run also run backward. So the best a cache can do is
T_all / (T_all - T_frozen_forward), printed as ``ideal``; forward-only epochs (validation)
do approach L / (L-k+1) and are printed as ``val``.
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
from typing import List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._common import Clock, Result, build, main_for, paired, quiet, resolve_device, vit_name

NAME = "frozen_cache"


def run(quick: bool = False, device: Optional[torch.device] = None, clock: Optional[Clock] = None,
        backbone: str = "mae_vitb16", insert_at_block: Union[int, Sequence[int], None] = None,
        num_prompts: int = 10, num_images: Optional[int] = None, batch: Optional[int] = None,
        image_size: Optional[int] = None, repeats: Optional[int] = None, bf16: Optional[bool] = None,
        **_) -> List[Result]:
    """One line per insertion block: k = 7 (``frozen_cache``), and in the full run also k = 4 and
    10 (``frozen_cache_k4``, ``frozen_cache_k10``): the target moves with k faster than the cache's
    ideal does, so one k alone would say little. ``bf16``: autocast to bfloat16 (default: on CUDA only)."""
    ks = insert_at_block if insert_at_block is not None else ((7,) if quick else (7, 4, 10))
    ks = [ks] if isinstance(ks, int) else list(ks)
    device = device or resolve_device()
    clock = clock or Clock("cpu", device)
    return [run_one(k, i == 0, quick, device, clock, backbone, num_prompts, num_images, batch, image_size, repeats,
                    bf16) for i, k in enumerate(ks)]


def check_cache(model, images: torch.Tensor, cached: torch.Tensor, device: torch.device,
                amp: Optional[torch.dtype], rtol: float = 1e-3) -> float:
    """The largest |logit difference| between ``forward_from_frozen(cached)`` and the full forward of
    ``images``; AssertionError past ``rtol`` x max(1, max |logit|). Both sides run under the same
    precision as the cache was built (``amp``: bf16 autocast, or None for fp32): comparing a bf16 cache
    with an fp32 forward would measure bf16's rounding (8 mantissa bits, ~4e-3 relative), not the cache."""
    with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        full = model(images.to(device)).float()
        diff = (model.forward_from_frozen(cached.to(device)).float() - full).abs().max().item()
    if not diff <= rtol * max(1.0, full.abs().max().item()):
        raise AssertionError(f"forward_from_frozen differs from forward by {diff:.3g}"
                             f" (both forwards under {'bf16 autocast' if amp else 'fp32'})")
    return diff


def run_one(k: int, main_line: bool, quick: bool, device: torch.device, clock: Clock, backbone: str,
            num_prompts: int, num_images: Optional[int], batch: Optional[int], image_size: Optional[int],
            repeats: Optional[int], bf16: Optional[bool] = None) -> Result:
    from gapt.engine.schedule import LRSchedule
    from gapt.engine.trainer import evaluate, precompute_frozen, train_one_epoch

    cuda = device.type == "cuda"
    batch = batch or (64 if cuda else 2)
    num_images = num_images or (4 * batch if cuda else (2 if quick else 16))
    repeats = repeats or (3 if quick else 5)
    model = build(backbone, method="vpt-at-block", insert_at_block=k, num_prompts=num_prompts, num_classes=10,
                  image_size=image_size).to(device)
    L = model.depth
    g = torch.Generator().manual_seed(0)
    images = torch.randn(num_images, 3, model.image_size, model.image_size, generator=g)
    labels = torch.randint(0, 10, (num_images,), generator=g)
    data = TensorDataset(images, labels)
    amp = torch.bfloat16 if (cuda if bf16 is None else bf16) else None

    model.eval()
    cached = {}

    def build_cache():
        with quiet():
            cached["data"] = precompute_frozen(model, data, batch, device, amp, "cache frozen blocks")
    build_s = clock.time(build_cache)
    prefixes = cached["data"]
    # the cache must give the same logits as the full forward, both at the precision the epochs run at
    diff = check_cache(model, images[:batch], prefixes.tensors[0][:batch], device, amp)

    full_loader = DataLoader(data, batch_size=batch, shuffle=False)
    cached_loader = DataLoader(prefixes, batch_size=batch, shuffle=False)
    params = list(model.tuned_parameters().values())
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    schedule = LRSchedule(1e-3, 100, 0, len(full_loader))

    def epoch(forward, loader):
        def go():
            with quiet():
                train_one_epoch(model, forward, loader, opt, schedule, 50, device, amp)
        return go

    t = paired(epoch(model, full_loader), epoch(model.forward_from_frozen, cached_loader), repeats, clock)

    def val(forward, dataset):
        def go():
            with quiet():
                evaluate(forward, dataset, batch, device, amp, desc="val")
        return go
    model.eval()
    v = paired(val(model, data), val(model.forward_from_frozen, prefixes), repeats, clock)

    target = L / (L - k + 1) * 0.8
    ideal = t.baseline_s / max(t.baseline_s - build_s, 1e-12)
    precision = "bf16 autocast" if amp is not None else "fp32"
    detail = (f"engine train_one_epoch from cached block-{k - 1} outputs vs all {L} blocks, vpt-at-block k={k}, "
              f"{vit_name(model)}, {num_prompts} prompts, {num_images} images, batch {batch}, {precision}, "
              f"{clock.describe()}: {t.baseline_s:.2f}s -> {t.candidate_s:.2f}s per epoch, {t.spread()}; "
              f"ideal (skip exactly the frozen blocks' forward) {ideal:.2f}x; val epochs {v.ratio:.2f}x; "
              f"cache build {build_s:.2f}s = {build_s / max(t.baseline_s, 1e-12):.2f} epochs")
    return Result(NAME if main_line else f"{NAME}_k{k}", t.ratio, detail, target,
                  extra={"timing": t, "val": v, "ideal": ideal, "build_s": build_s, "logit_diff": diff})


def _args(p):
    p.add_argument("--insert-at-block", type=int, nargs="+", default=None,
                   help="insertion block(s) k; default 7 (--quick) or 7 4 10")
    p.add_argument("--num-prompts", type=int, default=10)
    p.add_argument("--num-images", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on CUDA only)")


if __name__ == "__main__":
    main_for(run, __doc__.splitlines()[0], _args)
