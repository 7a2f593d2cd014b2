"""train_step: forward + backward + SGD step of gated + temperature prompt tuning, gapt vs the naive reference.

Both models hold the same frozen weights (the naive one copies gapt's timm backbone) and the
logits are checked to agree to 1e-4 before anything is timed. Both train with prompt dropout
on, the backbone frozen (no weight gradients), SGD with momentum over prompts, gates,
temperatures and head.

* CPU: fp32 both; target >= 1.15x. The ratio grows with the batch (the naive reference's
  (B, heads, S, S) attention tensors turn it memory-bound): the full run uses batch 16, the
  quick one batch 2 (see README.md).
* CUDA: gapt with bf16 autocast, its fused attention and ``torch.compile`` against the naive
  reference in fp32 (no TF32); target >= 3x. Printed as ``skipped`` without a CUDA device.

``--profile [--batch N]`` prints torch.profiler's top operators of one CPU step of each model,
their split into linear layers / attention / other, and the attention core alone.
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from benchmarks._common import Clock, Result, build, main_for, paired, vit_name
from benchmarks.naive_reference import NaiveGatedViT, check_equal

NAME = "train_step"
CPU_TARGET, CUDA_TARGET = 1.15, 3.0


def build_pair(backbone: str = "mae_vitb16", num_prompts: int = 100, num_classes: int = 100,
               image_size: Optional[int] = None, device: torch.device = torch.device("cpu"), seed: int = 0):
    """(gapt gated + temperature model, naive reference with the same weights), both on ``device``."""
    model = build(backbone, method="gated", learn_temperature=True, num_prompts=num_prompts,
                  num_classes=num_classes, image_size=image_size, seed=seed)
    naive = NaiveGatedViT.from_gapt(model)
    return model.to(device), naive.to(device)


def make_step(forward: Callable, params, images: torch.Tensor, labels: torch.Tensor,
              amp_dtype: Optional[torch.dtype] = None) -> Callable[[], float]:
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def step():
        with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = F.cross_entropy(forward(images).float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def _batch(model, batch: int, device, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, model.image_size, model.image_size, generator=g).to(device)
    labels = torch.randint(0, model.num_classes, (batch,), generator=g).to(device)
    return images, labels


def _tuned(module) -> list:
    return [p for p in module.parameters() if p.requires_grad]


def run_cpu(backbone="mae_vitb16", batch=2, num_prompts=100, image_size=None, repeats=5,
            clock: Optional[Clock] = None) -> Result:
    device = torch.device("cpu")
    clock = clock or Clock("cpu", device)
    model, naive = build_pair(backbone, num_prompts, image_size=image_size, device=device)
    images, labels = _batch(model, batch, device)
    diff = check_equal(model, naive, images[:2], atol=1e-4)
    model.train()
    naive.train()
    gapt_step = make_step(model, _tuned(model), images, labels)
    naive_step = make_step(naive, naive.tuned_parameters(), images, labels)
    t = paired(naive_step, gapt_step, repeats, clock)
    detail = (f"gapt gated+temperature vs naive reference (explicit softmax, logits / tau, torch.cat prompts), "
              f"fwd+bwd+SGD step, {vit_name(model)}, {num_prompts} prompts, batch {batch}, fp32, "
              f"{clock.describe()}: {t.baseline_s:.3f}s -> {t.candidate_s:.3f}s per step, {t.spread()}; "
              f"max |logit diff| {diff:.1e}")
    return Result(NAME, t.ratio, detail, CPU_TARGET, extra={"timing": t, "logit_diff": diff})


def run_cuda(backbone="mae_vitb16", batch=64, num_prompts=100, image_size=None, repeats=10,
             compile_model=True, device: Optional[torch.device] = None) -> Result:
    if not torch.cuda.is_available():
        return Result(f"{NAME}_cuda", None, "no CUDA device")
    device = device if device is not None and device.type == "cuda" else torch.device("cuda")
    return run_accelerated(device, backbone, batch, num_prompts, image_size, repeats, compile_model)


def run_accelerated(device: torch.device, backbone="mae_vitb16", batch=64, num_prompts=100, image_size=None,
                    repeats=10, compile_model=True) -> Result:
    """gapt with bf16 autocast, fused attention and ``torch.compile`` vs the naive reference in fp32.

    Meant for CUDA (``train_step_cuda``); it also runs on CPU, where the tests use it to check the
    whole path (autocast, compile, the equality check) on a tiny model, without reading the ratio.
    """
    name = f"{NAME}_{device.type}"
    clock = Clock("wall", device)
    cuda = device.type == "cuda"
    if cuda:
        prev_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a true fp32 baseline
    try:
        model, naive = build_pair(backbone, num_prompts, image_size=image_size, device=device)
        images, labels = _batch(model, batch, device)
        diff = check_equal(model, naive, images[:2], atol=1e-4)
        model.train()
        naive.train()
        forward, how = model, "eager"
        if compile_model:
            try:
                forward, how = torch.compile(model), "torch.compile"
                make_step(forward, _tuned(model), images, labels, torch.bfloat16)()  # compile outside timing
            except Exception as e:  # noqa: BLE001 - report and time eager rather than fail the suite
                forward, how = model, f"eager (compile failed: {type(e).__name__}: {e})"
        gapt_step = make_step(forward, _tuned(model), images, labels, torch.bfloat16)
        naive_step = make_step(naive, naive.tuned_parameters(), images, labels)
        t = paired(naive_step, gapt_step, repeats, clock, warmup=2)
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev_tf32
    detail = (f"gapt bf16 autocast + SDPA + {how} vs naive reference fp32{' (no TF32)' if cuda else ''}, "
              f"fwd+bwd+SGD step, {vit_name(model)}, {num_prompts} prompts, batch {batch}, {clock.describe()}: "
              f"{t.baseline_s * 1e3:.1f}ms -> {t.candidate_s * 1e3:.1f}ms per step, {t.spread()}; "
              f"fp32 max |logit diff| {diff:.1e}")
    return Result(name, t.ratio, detail, CUDA_TARGET if cuda else None,
                  extra={"timing": t, "compiled": how == "torch.compile"})


def _categories(events) -> str:
    """Self CPU time split into the frozen linear layers, attention and everything else.

    ``events`` are grouped by input shape: an operator on an (.., S, S) attention matrix
    counts as attention, as do the fused kernel, bmm and softmax.
    """
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    groups = {"linear layers (addmm/mm)": 0.0, "attention": 0.0, "other": 0.0}
    for e in events:
        square = any(len(s) >= 2 and s[-1] == s[-2] and s[-1] > 1 for s in (e.input_shapes or []) if s)
        if e.key in ("aten::addmm", "aten::mm"):
            groups["linear layers (addmm/mm)"] += e.self_cpu_time_total
        elif "scaled_dot_product" in e.key or "softmax" in e.key or e.key == "aten::bmm" or square:
            groups["attention"] += e.self_cpu_time_total
        else:
            groups["other"] += e.self_cpu_time_total
    return ", ".join(f"{k} {v / 1e6:.2f}s ({100 * v / total:.0f}%)" for k, v in groups.items())


def profile_cpu(backbone="mae_vitb16", batch=2, num_prompts=100, image_size=None, rows=15) -> str:
    """torch.profiler tables (top operators by self CPU time) of one step of each model."""
    from torch.profiler import ProfilerActivity, profile
    model, naive = build_pair(backbone, num_prompts, image_size=image_size)
    images, labels = _batch(model, batch, torch.device("cpu"))
    model.train()
    naive.train()
    out = []
    for label, step in [("gapt", make_step(model, _tuned(model), images, labels)),
                        ("naive", make_step(naive, naive.tuned_parameters(), images, labels))]:
        step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
        events = prof.key_averages()
        by_shape = prof.key_averages(group_by_input_shape=True)
        out.append(f"== {label}: one training step, {vit_name(model)}, {num_prompts} prompts, batch {batch}, "
                   f"{torch.get_num_threads()} thread(s) ==")
        out.append(_categories(by_shape))
        out.append(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
        out.append(by_shape.table(
            sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=45, max_shapes_column_width=60))
    return "\n".join(out)


def attention_core_times(batch: int = 2, tokens: int = 297, heads: int = 12, head_dim: int = 64,
                         repeats: int = 5, clock: Optional[Clock] = None) -> str:
    """Forward + backward of the attention core alone (from the qkv projection's output to the heads'
    output, gradient to qkv and tau), gapt's q / tau + fused SDPA vs the naive explicit softmax."""
    clock = clock or Clock("cpu")
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, tokens, 3 * heads * head_dim, generator=g).requires_grad_(True)
    tau = torch.ones((), requires_grad=True)
    grad = torch.randn(batch, heads, tokens, head_dim, generator=g)

    def split():
        return qkv.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def fused():
        q, k, v = split()
        F.scaled_dot_product_attention(q / tau, k, v).backward(grad)

    def explicit():
        q, k, v = split()
        logits = (q @ k.transpose(-2, -1)) * head_dim ** -0.5 / tau
        (logits.softmax(-1) @ v).backward(grad)

    t = paired(explicit, fused, repeats, clock)
    return (f"attention core fwd+bwd per layer (batch {batch}, {heads} heads, {tokens} tokens, d {head_dim}): "
            f"naive explicit softmax {t.baseline_s * 1e3:.1f} ms, gapt q/tau + SDPA {t.candidate_s * 1e3:.1f} ms "
            f"({t.ratio:.2f}x, {t.spread()})")


def run(quick: bool = False, device: Optional[torch.device] = None, clock: Optional[Clock] = None,
        backbone: str = "mae_vitb16", batch: Optional[int] = None, num_prompts: int = 100,
        image_size: Optional[int] = None, repeats: Optional[int] = None, cuda: bool = True,
        accelerated: bool = False, compile_model: bool = True, **_) -> List[Result]:
    """``--device cuda`` runs only the CUDA line (the CPU fp32 step would take minutes there and
    its figure comes from the CPU machine); on CPU both lines, the CUDA one skipped without a GPU."""
    if accelerated:
        return [run_accelerated(device or torch.device("cpu"), backbone, batch or (2 if quick else 8), num_prompts,
                                image_size, repeats or 2, compile_model)]
    results = []
    if device is None or device.type == "cpu":
        results.append(run_cpu(backbone, batch or (2 if quick else 16), num_prompts, image_size,
                               repeats or (2 if quick else 3), clock if clock and clock.device.type == "cpu" else None))
    if cuda:
        results.append(run_cuda(backbone, 64 if batch is None else batch, num_prompts, image_size,
                                repeats or (5 if quick else 10), device=device))
    return results


def _args(p):
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--profile", action="store_true", help="print torch.profiler top ops of a CPU step and exit")
    p.add_argument("--accelerated", action="store_true",
                   help="only the bf16 + torch.compile recipe of train_step_cuda, on --device (CPU included)")
    p.add_argument("--no-compile", dest="compile_model", action="store_false",
                   help="with --accelerated: bf16 autocast without torch.compile")


if __name__ == "__main__":
    import sys
    if "--profile" in sys.argv:
        torch.set_num_threads(1)
        batch = 2
        if "--batch" in sys.argv:
            batch = int(sys.argv[sys.argv.index("--batch") + 1])
        print(profile_cpu(batch=batch))
        print(attention_core_times(batch=batch))
    else:
        main_for(run, __doc__.splitlines()[0], _args)
