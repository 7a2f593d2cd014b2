"""prompt_methods: train-step time, eval throughput and peak memory of VFPT and E2VPT relative to VPT-deep at the
same prompt count per block, in one run.

Rows (every one deep, M prompts per block, on the same random frozen backbone): vpt-deep; vfpt with alpha 1 and
0.5 (the 2-D FFT of the inserted prompts); e2vpt with M_kv key-value prompts per block and its masks learned
(before pruning), fixed (a rewound run: 40 % of the tokens and 8 of 16 pieces masked, frozen) and none; e2vpt
with learned temperatures. Each figure is a ratio to vpt-deep's, measured in this process:

* train: the median time of one step (forward, backward, SGD with momentum over the tuned tensors), batch B;
* eval: vpt-deep's inference time over the row's (images/s relative to vpt-deep's) under ``torch.inference_mode``;
* memory: the peak of one training step (CUDA: the allocator's peak above what was allocated before; CPU: live
  tensor storage bytes, as benchmarks/memory.py counts them).

Timings go round-robin over the rows, in alternating order, after a warm-up round. ``--vitb16`` adds the
ViT-B/16 (224 px, M = 10, M_kv = 5) rows to the micro ViT's; ``--bf16`` runs under bf16 autocast (CUDA).
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import contextlib
import statistics
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from benchmarks._common import Clock, Result, build, main_for, resolve_device, vit_name
from benchmarks.memory import peak_bytes as _peak

NAME = "prompt_methods"
MICRO, VITB = "mae_vit_micro", "mae_vitb16"

def specs(prompts: int, kv: int) -> List[Tuple[str, dict]]:
    masked_tokens = list(range(int(prompts * 0.4)))
    return [("vpt-deep", dict(method="vpt-deep")),
            ("vfpt a=1", dict(method="vfpt", fourier_fraction=1.0)),
            ("vfpt a=0.5", dict(method="vfpt", fourier_fraction=0.5)),
            ("e2vpt", dict(method="e2vpt", kv_prompts=kv)),
            ("e2vpt fixed masks", dict(method="e2vpt", kv_prompts=kv, e2vpt_masks="fixed",
                                       e2vpt_masked_tokens=masked_tokens,
                                       e2vpt_masked_pieces=[list(range(8))] * prompts)),
            ("e2vpt no masks", dict(method="e2vpt", kv_prompts=kv, e2vpt_masks="none")),
            ("e2vpt+temperature", dict(method="e2vpt", kv_prompts=kv, learn_temperature=True))]

def _autocast(device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)

def _train_step(model, images, labels, device, bf16) -> Callable[[], None]:
    opt = torch.optim.SGD(list(model.tuned_parameters().values()), lr=1e-4, momentum=0.9)

    def step():
        with _autocast(device, bf16):
            loss = F.cross_entropy(model(images).float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step

def _eval_pass(model, images, device, bf16) -> Callable[[], None]:
    def forward():
        with torch.inference_mode(), _autocast(device, bf16):
            model(images)
    return forward

def measure(backbone: str, batch: int, repeats: int, clock: Clock, device, prompts: int, kv: int,
            bf16: bool = False) -> Tuple[Dict[str, Dict[str, float]], str]:
    models = {}
    for label, kw in specs(prompts, kv):
        model = build(backbone, num_classes=100, seed=0, num_prompts=prompts, **kw).to(device)
        with torch.no_grad():
            for p in model.tuned_parameters().values():
                p.add_(torch.randn_like(p) * 0.01)
        models[label] = model
    size = next(iter(models.values())).image_size
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, 100, (batch,), generator=g).to(device)
    passes = [(label, kind, fn) for label, m in models.items()
              for kind, fn in (("train", _train_step(m, images, labels, device, bf16)),
                               ("eval", _eval_pass(m, images, device, bf16)))]
    times: Dict[Tuple[str, str], List[float]] = {(label, kind): [] for label, kind, _ in passes}
    peaks: Dict[str, float] = {}
    for label, kind, fn in passes:  # warm-up round; the training step's peak memory
        models[label].train(kind == "train")
        if kind == "train":
            peaks[label] = _peak(fn, device)
        else:
            fn()
    for r in range(max(1, repeats)):
        for label, kind, fn in (passes if r % 2 == 0 else passes[::-1]):
            models[label].train(kind == "train")
            times[(label, kind)].append(clock.time(fn))
    med = {key: statistics.median(v) for key, v in times.items()}
    base = "vpt-deep"
    out = {label: {"train_vs_vpt_deep": med[(label, "train")] / med[(base, "train")],
                   "eval_vs_vpt_deep": med[(base, "eval")] / med[(label, "eval")],
                   "memory_vs_vpt_deep": peaks[label] / peaks[base], "train_s": med[(label, "train")],
                   "eval_s": med[(label, "eval")], "peak_bytes": peaks[label],
                   "tuned": models[label].num_tuned()} for label in models}
    return out, vit_name(models[base])

def run(quick: bool = False, device: Optional[torch.device] = None, clock: Optional[Clock] = None,
        vitb16: bool = False, backbone: str = MICRO, batch: Optional[int] = None, repeats: Optional[int] = None,
        bf16: bool = False, **_) -> List[Result]:
    device = device or resolve_device()
    clock = clock or Clock("cpu", device)
    sizes = [(backbone, batch or (8 if quick else 32), 4, 2)]
    if vitb16:
        sizes.append((VITB, batch or (2 if quick else (64 if device.type == "cuda" else 8)), 10, 5))
    results: List[Result] = []
    for name, b, prompts, kv in sizes:
        rows, what = measure(name, b, repeats or (3 if quick else 7), clock, device, prompts, kv, bf16)
        tag = what.split(" ")[0] if "ViT-B" in what else "micro"
        for label, r in rows.items():
            detail = (f"train step {r['train_vs_vpt_deep']:.2f}x vpt-deep's time ({r['train_s'] * 1e3:.1f} ms); "
                      f"eval {r['eval_vs_vpt_deep']:.2f}x vpt-deep's images/s; peak step memory "
                      f"{r['memory_vs_vpt_deep']:.2f}x vpt-deep's ({r['peak_bytes'] / 1e6:.1f} MB); {r['tuned']} tuned; "
                      f"{what}, batch {b}, {prompts} prompts per block, kv {kv}{', bf16' if bf16 else ''}, "
                      f"{clock.describe()}")
            results.append(Result(f"{NAME}[{label}, {tag}]", r["train_vs_vpt_deep"], detail, extra=r))
    return results

def _args(p):
    p.add_argument("--vitb16", action="store_true", help="also the ViT-B/16 rows (slow on a CPU)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")

if __name__ == "__main__":
    main_for(run, __doc__.splitlines()[0], _args)
