"""eval_throughput: inference images/s of gapt (gated + temperature) vs the naive reference.

Same weights in both (logits checked to 1e-4 first); ``torch.inference_mode``; the naive
reference in fp32; gapt in fp32 on CPU and with bf16 autocast on CUDA. The ratio is gapt's
images/s over the naive reference's.
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from typing import List, Optional

import torch

from benchmarks._common import Clock, Result, main_for, paired, resolve_device, vit_name
from benchmarks.naive_reference import check_equal
from benchmarks.train_step import build_pair

NAME = "eval_throughput"


def run(quick: bool = False, device: Optional[torch.device] = None, clock: Optional[Clock] = None,
        backbone: str = "mae_vitb16", batch: Optional[int] = None, num_prompts: int = 100,
        image_size: Optional[int] = None, repeats: Optional[int] = None, bf16: Optional[bool] = None,
        **_) -> List[Result]:
    """``bf16``: gapt under bf16 autocast (default: on CUDA only; the tests also run it on CPU)."""
    device = device or resolve_device()
    clock = clock or Clock("cpu", device)
    cuda = device.type == "cuda"
    batch = batch or ((128 if not quick else 64) if cuda else (2 if quick else 16))
    repeats = repeats or (3 if quick else 5) * (4 if cuda else 1)
    model, naive = build_pair(backbone, num_prompts, image_size=image_size, device=device)
    images = torch.randn(batch, 3, model.image_size, model.image_size,
                         generator=torch.Generator().manual_seed(1)).to(device)
    diff = check_equal(model, naive, images[:2], atol=1e-4)
    model.eval()
    naive.eval()
    amp = torch.bfloat16 if (cuda if bf16 is None else bf16) else None

    def gapt_forward():
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            model(images)

    def naive_forward():
        with torch.inference_mode():
            naive(images)

    t = paired(naive_forward, gapt_forward, repeats, clock, warmup=2 if cuda else 1)
    precision = "gapt bf16 autocast vs naive fp32" if amp else "fp32"
    detail = (f"gapt {batch / t.candidate_s:.1f} img/s vs naive reference {batch / t.baseline_s:.1f} img/s, "
              f"inference mode, {vit_name(model)}, gated+temperature, {num_prompts} prompts, batch {batch}, "
              f"{precision}, {clock.describe()}, {t.spread()}; max |logit diff| {diff:.1e}")
    return [Result(NAME, t.ratio, detail, extra={"timing": t})]


def _args(p):
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--repeats", type=int, default=None)


if __name__ == "__main__":
    main_for(run, __doc__.splitlines()[0], _args)
