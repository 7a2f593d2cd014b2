"""memory: peak memory of a training step (gated + temperature) and the largest batch in a budget,
with and without activation checkpointing of the frozen blocks (``model.grad_checkpointing``,
config ``train.grad_checkpointing=true``).

How memory is measured:

* CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``) during a step,
  minus what was allocated before it.
* CPU: the peak of live tensor storage bytes created during the step, counted exactly by a
  ``TorchDispatchMode`` that sees every operator's outputs and a finaliser on every new
  storage (RSS would mostly measure malloc's caching; kernel-internal scratch buffers are not
  tensors and are not counted).

A step's peak is linear in the batch (every activation has the batch as a dimension), so it
is measured at a few small batches, fitted as ``a + b * batch`` (the fit's worst relative
error is printed) and evaluated at batch 64 and at the budget. The budget holds the model
too: frozen weights, tuned tensors with their gradients and SGD momentum.
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import gc
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmarks._common import Clock, Result, build, gb, main_for, resolve_device, vit_name

NAME = "memory"


class LiveTensorBytes(TorchDispatchMode):
    """Counts bytes of the tensor storages created inside the mode while they are alive; keeps the peak."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: Dict[int, int] = {}

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self._sizes:  # a view or in-place result: nothing new
                continue
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key)
        return out


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes of tensors alive while ``fn`` runs, above what was allocated before it (CUDA: the
    allocator's own peak; CPU: :class:`LiveTensorBytes`)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with LiveTensorBytes() as tracker:
        fn()
    return tracker.peak


def resident_bytes(model) -> int:
    """Model weights and buffers, plus one gradient and one SGD momentum buffer per tuned tensor."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    tuned = sum(p.numel() * p.element_size() for p in model.tuned_parameters().values())
    return weights + buffers + 2 * tuned


def step_peak_bytes(model, batch: int, device: torch.device, amp: Optional[torch.dtype] = None) -> int:
    """Peak extra bytes of one training step at ``batch`` (its inputs included)."""
    model.train()
    params = list(model.tuned_parameters().values())
    for p in params:
        p.grad = None
    opt = torch.optim.SGD(params, lr=1e-3)  # momentum buffers count in resident_bytes, not here
    gc.collect()

    def step():
        images = torch.randn(batch, 3, model.image_size, model.image_size, device=device)
        labels = torch.randint(0, model.num_classes, (batch,), device=device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.cross_entropy(model(images).float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    peak = peak_bytes(step, device)
    for p in params:
        p.grad = None
    return int(peak)


def fit_line(points: Sequence[Tuple[int, int]]) -> Tuple[float, float, float]:
    """Least-squares ``a + b * x``; returns (a, b, worst relative error at the points)."""
    n = len(points)
    xs = [float(x) for x, _ in points]
    ys = [float(y) for _, y in points]
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    err = max(abs(a + b * x - y) / max(y, 1.0) for x, y in zip(xs, ys))
    return a, b, err


def run(quick: bool = False, device: Optional[torch.device] = None, clock: Optional[Clock] = None,
        backbone: str = "mae_vitb16", num_prompts: int = 100, budget_gb: float = 8.0, at_batch: int = 64,
        batches: Optional[Sequence[int]] = None, image_size: Optional[int] = None, **_) -> List[Result]:
    device = device or resolve_device()
    cuda = device.type == "cuda"
    if not batches:
        batches = ((8, 16) if quick else (8, 16, 32)) if cuda else ((1, 2) if quick else (1, 2, 4))
    batches = list(batches)
    amp = torch.bfloat16 if cuda else None
    model = build(backbone, method="gated", learn_temperature=True, num_prompts=num_prompts, num_classes=100,
                  image_size=image_size).to(device)
    resident = resident_bytes(model)
    budget = budget_gb * 1e9
    found = {}
    for ckpt in (False, True):
        model.grad_checkpointing = ckpt
        if cuda:  # cuBLAS workspaces etc. are allocated by the first step and stay: not per-step memory
            step_peak_bytes(model, batches[0], device, amp)
        a, b, err = fit_line([(n, step_peak_bytes(model, n, device, amp)) for n in batches])
        found[ckpt] = {"per_image": b, "fixed": a, "fit_error": err, "at_batch": resident + a + b * at_batch,
                       "max_batch": max(0, int((budget - resident - a) // b))}
    model.grad_checkpointing = False
    plain, ckpt = found[False], found[True]
    ratio = ckpt["max_batch"] / max(plain["max_batch"], 1)
    how = "cuda allocator peak" if cuda else "cpu live tensor bytes"
    precision = "bf16 autocast" if cuda else "fp32"
    detail = (f"largest batch in {budget_gb:g} GB with/without grad checkpointing: {plain['max_batch']} -> "
              f"{ckpt['max_batch']}; training step peak at batch {at_batch}: {gb(plain['at_batch'])} -> "
              f"{gb(ckpt['at_batch'])} ({gb(plain['per_image'])} -> {gb(ckpt['per_image'])} per image, model "
              f"{gb(resident)}); {vit_name(model)}, gated+temperature, {num_prompts} prompts, {precision}, {how}, "
              f"fitted a + b*batch over measured batches {', '.join(map(str, batches))} "
              f"(worst fit error {100 * max(plain['fit_error'], ckpt['fit_error']):.1f}%)")
    return [Result(NAME, ratio, detail, extra={"plain": plain, "checkpointing": ckpt, "resident": resident})]


def _args(p):
    p.add_argument("--budget-gb", type=float, default=8.0)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--at-batch", type=int, default=64)


if __name__ == "__main__":
    main_for(run, __doc__.splitlines()[0], _args)
