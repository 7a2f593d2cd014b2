"""methods: train-step time, eval throughput and peak memory of every method, relative to linear probing and
VPT-deep, in one run.

Rows: linear, vpt-shallow, vpt-deep, gated + temperature, lora (qkv), lora (q,v), adaptformer, bitfit, ssf,
full, and the merged LoRA and SSF models (``gapt.merge``: plain timm ViTs, inference only). Every model holds
the same random frozen backbone (one seed). Each figure is a ratio measured in this process:

* train: the median time of one step (forward, backward, SGD with momentum over the tuned tensors) at the
  same batch, divided by linear probing's and by VPT-deep's (linear here runs the whole frozen forward; the
  trainer's feature cache would make it cheaper still);
* eval: images/s under ``torch.inference_mode`` divided by linear's (the frozen backbone's own speed) and by
  VPT-deep's;
* memory: the peak of one training step (merged rows: of one inference forward), measured as
  benchmarks/memory.py does (CUDA: the allocator's peak; CPU: live tensor storage bytes), divided by linear's
  (same kind of pass) and VPT-deep's.

Every row is timed back to back with linear probing, alternating which goes first, and each figure is the
median of those per-pair ratios (as benchmarks/_common.paired does), so load on a shared machine that lasts
longer than a pair cancels; training steps first, then the forwards, each kind in a phase of its own (an eval
pass timed right after a heavy training step ran about 10% slower). VPT-deep's ratios are the rows' ratios to
linear divided by VPT-deep's. ``--vitb16`` adds the ViT-B/16 (224 px) rows to the micro ViT's
(``mae_vit_micro``, 6 blocks, width 64, 32 px): minutes on a CPU.
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import statistics
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from benchmarks._common import Clock, Result, build, main_for, quiet, resolve_device, vit_name
from benchmarks.memory import peak_bytes as _peak

NAME = "methods"
MICRO, VITB = "mae_vit_micro", "mae_vitb16"

@dataclass
class Row:
    label: str
    model: torch.nn.Module
    trainable: bool = True
    times: Dict[str, List[float]] = field(default_factory=lambda: {"train": [], "eval": []})  # ratios to linear
    peak: Dict[str, float] = field(default_factory=dict)  # "train" (a step) and "eval" (a forward), bytes

def build_rows(backbone: str, prompts: int, deep_prompts: int, image_size: Optional[int], device) -> List[Row]:
    """Every method on the same random backbone (seed 0), tuned tensors moved off their initial values."""
    specs: List[Tuple[str, dict]] = [
        ("linear", dict(method="linear")), ("vpt-shallow", dict(method="vpt-shallow", num_prompts=prompts)),
        ("vpt-deep", dict(method="vpt-deep", num_prompts=deep_prompts)),
        ("gated+temperature", dict(method="gated", num_prompts=prompts, learn_temperature=True)),
        ("lora", dict(method="lora")), ("lora q,v", dict(method="lora", lora_targets="q,v")),
        ("adaptformer", dict(method="adaptformer")), ("bitfit", dict(method="bitfit")), ("ssf", dict(method="ssf")),
        ("full", dict(method="full"))]
    rows = []
    for label, kw in specs:
        model = build(backbone, num_classes=100, image_size=image_size, seed=0, **kw).to(device)
        with torch.no_grad():  # LoRA's B and the adapters' up-projection start at 0: make them count
            for p in model.tuned_parameters().values():
                p.add_(torch.randn_like(p) * 0.01)
        rows.append(Row(label, model))
    import gapt
    with quiet():
        for label in ("lora", "ssf"):
            source = next(r.model for r in rows if r.label == label)
            rows.append(Row(f"merged {label}", gapt.merge(source).to(device), trainable=False))
    return rows

def _train_step(model, images, labels) -> Callable[[], None]:
    params = list(model.tuned_parameters().values())
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)

    def step():
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step

def _eval_pass(model, images) -> Callable[[], None]:
    def forward():
        with torch.inference_mode():
            model(images)
    return forward

def measure(backbone: str, batch: int, repeats: int, clock: Clock, device, prompts: int, deep_prompts: int,
            image_size: Optional[int] = None) -> Tuple[List[Row], str]:
    """Peaks from the second pass of each (after a warm-up), then per kind and round, every row timed back to
    back with linear probing (alternating which goes first): ``row.times[kind]`` holds the per-pair time ratios
    row / linear, so load that lasts longer than a pair cancels."""
    rows = build_rows(backbone, prompts, deep_prompts, image_size, device)
    size = rows[0].model.image_size
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, 100, (batch,), generator=g).to(device)
    passes: Dict[str, Dict[str, Callable[[], None]]] = {"train": {}, "eval": {}}
    for row in rows:
        if row.trainable:
            passes["train"][row.label] = _train_step(row.model, images, labels)
        passes["eval"][row.label] = _eval_pass(row.model, images)
    by_label = {r.label: r for r in rows}

    def run_pass(label: str, kind: str, timed: bool = True) -> float:
        by_label[label].model.train(kind == "train")  # a training step in train mode, a forward in eval mode
        return clock.time(passes[kind][label]) if timed else _peak(passes[kind][label], device)

    for kind in ("train", "eval"):
        for label in passes[kind]:
            run_pass(label, kind)  # warm-up; the first step also creates SGD's momentum buffers
            by_label[label].peak[kind] = run_pass(label, kind, timed=False)
        for r in range(max(1, repeats)):
            for label in passes[kind]:
                if label == "linear":  # the reference itself
                    by_label[label].times[kind].append(1.0)
                    continue
                if r % 2 == 0:
                    base = run_pass("linear", kind)
                    cand = run_pass(label, kind)
                else:
                    cand = run_pass(label, kind)
                    base = run_pass("linear", kind)
                by_label[label].times[kind].append(cand / base)
    return rows, vit_name(rows[0].model)

def ratios(rows: List[Row]) -> Dict[str, Dict[str, Optional[float]]]:
    """Per row (medians of the per-pair ratios): train time / linear's and / vpt-deep's, eval images/s /
    linear's and / vpt-deep's, peak memory (trainable rows: of a training step; merged rows: of a forward) /
    linear's and vpt-deep's of the same pass."""
    med = {r.label: {k: statistics.median(v) for k, v in r.times.items() if v} for r in rows}
    deep, peak = med["vpt-deep"], {r.label: r.peak for r in rows}
    out = {}
    for r in rows:
        m, kind = med[r.label], "train" if r.trainable else "eval"
        train = {} if not r.trainable else {"train_vs_linear": m["train"], "train_vs_vpt_deep": m["train"] / deep["train"]}
        out[r.label] = {**train, "eval_vs_linear": 1 / m["eval"], "eval_vs_vpt_deep": deep["eval"] / m["eval"],
                        "memory_vs_linear": r.peak[kind] / peak["linear"][kind],
                        "memory_vs_vpt_deep": r.peak[kind] / peak["vpt-deep"][kind], "peak_bytes": r.peak[kind]}
    return out

def run(quick: bool = False, device: Optional[torch.device] = None, clock: Optional[Clock] = None,
        vitb16: bool = False, backbone: str = MICRO, batch: Optional[int] = None, repeats: Optional[int] = None,
        **_) -> List[Result]:
    device = device or resolve_device()
    clock = clock or Clock("cpu", device)
    sizes = [(backbone, batch or (8 if quick else 32), 4, 4)]
    if vitb16:
        sizes.append((VITB, 2 if quick else 4, 100, 10))
    results: List[Result] = []
    for name, b, prompts, deep_prompts in sizes:
        rows, what = measure(name, b, repeats or (3 if quick else 5), clock, device, prompts, deep_prompts)
        for label, r in ratios(rows).items():
            train = (f"train step {r['train_vs_linear']:.2f}x linear's time, {r['train_vs_vpt_deep']:.2f}x "
                     f"vpt-deep's; " if "train_vs_linear" in r else "inference only; ")
            kind = "step" if "train_vs_linear" in r else "forward"
            detail = (f"{train}eval {r['eval_vs_linear']:.2f}x linear's images/s, {r['eval_vs_vpt_deep']:.2f}x "
                      f"vpt-deep's; peak {kind} memory {r['memory_vs_linear']:.2f}x linear's, "
                      f"{r['memory_vs_vpt_deep']:.2f}x vpt-deep's; {what}, batch {b}, prompts {prompts} "
                      f"(vpt-deep {deep_prompts} per block), {clock.describe()}")
            results.append(Result(f"{NAME}[{label}, {what.split(' ')[0] if 'ViT-B' in what else 'micro'}]",
                                  r["eval_vs_linear"], detail, extra=r))
    return results

def _args(p):
    p.add_argument("--vitb16", action="store_true", help="also the ViT-B/16 rows (slow on a CPU)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)

if __name__ == "__main__":
    main_for(run, __doc__.splitlines()[0], _args)
