"""One Deep Image Prior reconstruction (SPEC §10): the skip generator, the target (a block's tokens),
the loss, and the resumable job that fits them; the jobs and the figures are in :mod:`.reconstruct`.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

from .plotting import PathLike

log = logging.getLogger("gapt")



TARGET = "gapt.analysis.dip:run_reconstruct_job"  # what a job folder runs
JOB_FILE, STATE_FILE, RECON_PNG, ORIGINAL_PNG = "job.json", "state.pt", "recon.png", "original.png"
DEFAULTS = dict(steps=2000, lr=0.01, image_size=224, scales=5, channels=128, skip_channels=4, input_channels=32,
                input_scale=0.1, reg_noise_std=1.0 / 30, seed=0, save_every=100, log_every=200, render="train")
# render: the BatchNorm mode of the forward that draws the scored image; "train" (batch statistics) is what
# DIP's notebooks do, "eval" (running averages) is kept for comparison with folders made before.


# -- the generator (DIP "skip" network) ----------------------------------------------------------
def _conv(cin: int, cout: int, k: int, stride: int = 1) -> List[nn.Module]:
    # DIP pads by reflection so that the borders are not darker than the centre
    return [nn.ReflectionPad2d(k // 2), nn.Conv2d(cin, cout, k, stride=stride), nn.BatchNorm2d(cout),
            nn.LeakyReLU(0.2, inplace=True)]

class _Level(nn.Module):
    """One scale: a skip branch and a deeper branch (down 2x, [next level], up 2x), concatenated, then convs."""

    def __init__(self, cin: int, channels: int, skip: int, deeper: Optional[nn.Module]):
        super().__init__()
        self.skip = nn.Sequential(*_conv(cin, skip, 1)) if skip else None
        self.down = nn.Sequential(*_conv(cin, channels, 3, stride=2), *_conv(channels, channels, 3))
        self.deeper = deeper
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.merge = nn.Sequential(nn.BatchNorm2d(skip + channels), *_conv(skip + channels, channels, 3),
                                   *_conv(channels, channels, 1))

    def forward(self, x):
        y = self.down(x)
        if self.deeper is not None:
            y = self.deeper(y)
        y = self.up(y)
        if y.shape[-2:] != x.shape[-2:]:  # odd sizes: match the skip branch
            y = nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.merge(torch.cat([self.skip(x), y], 1) if self.skip is not None else y)

class SkipGenerator(nn.Module):
    """DIP's encoder-decoder with skip connections: ``scales`` levels of ``channels`` channels, sigmoid output."""

    def __init__(self, input_channels: int = 32, channels: int = 128, skip_channels: int = 4, scales: int = 5,
                 out_channels: int = 3):
        super().__init__()
        level = None
        for i in reversed(range(scales)):
            level = _Level(input_channels if i == 0 else channels, channels, skip_channels, level)
        self.body = level
        self.head = nn.Conv2d(channels, out_channels, 1)

    def forward(self, z):
        return torch.sigmoid(self.head(self.body(z)))

# -- one job ---------------------------------------------------------------------------------------
def load_image(path: PathLike, size: int) -> np.ndarray:
    """(size, size, 3) uint8: resized on the short side (bicubic) and centre-cropped; exactly what recon is scored against."""
    from PIL import Image
    try:
        im = Image.open(path).convert("RGB")
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise ValueError(f"cannot read image {path}: {e}") from None
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)

def _normalise(x: torch.Tensor) -> torch.Tensor:
    from ..data import IMAGENET_MEAN, IMAGENET_STD
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std

def block_tokens(vit, images: torch.Tensor, block: int) -> torch.Tensor:
    """The tokens leaving block ``block`` (1-based; CLS/registers and patches) of a timm ViT on normalised images."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    for i in range(block):
        x = vit.blocks[i](x)
    return x

def image_scores(recon_u8: np.ndarray, original_u8: np.ndarray) -> Dict[str, float]:
    """PSNR (data range 1) and SSIM (Gaussian window 11, sigma 1.5) from torchmetrics, on 8-bit images in [0, 1]."""
    try:
        from torchmetrics.functional.image import (
            peak_signal_noise_ratio,
            structural_similarity_index_measure,
        )
    except ImportError:
        raise ImportError("PSNR/SSIM need torchmetrics: pip install 'gapt[analysis]' (or pip install torchmetrics)") from None

    def t(a):
        return torch.from_numpy(np.array(a, dtype=np.uint8)).permute(2, 0, 1)[None].double() / 255.0
    p, o = t(recon_u8), t(original_u8)
    psnr = peak_signal_noise_ratio(p, o, data_range=1.0)
    ssim = structural_similarity_index_measure(p, o, data_range=1.0, kernel_size=11, sigma=1.5, gaussian_kernel=True)
    return {"psnr": float(psnr), "ssim": float(ssim)}

def _to_u8(x: torch.Tensor) -> np.ndarray:
    return (x[0].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)

def run_reconstruct_job(folder: PathLike, resume: bool = True, stop_after_step: Optional[int] = None) -> Dict[str, Any]:
    """Run (or resume) the DIP job whose ``job.json`` is in ``folder``; writes recon.png + results.json at the end.

    ``stop_after_step`` (tests): return after that step as if killed, leaving ``state.pt``."""
    from PIL import Image

    from ..engine import runfolder as rf
    from ..model.build import build_backbone

    folder = Path(folder)
    spec = {**DEFAULTS, **json.loads((folder / JOB_FILE).read_text())}
    device = torch.device(spec.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    size, block, steps = int(spec["image_size"]), int(spec["block"]), int(spec["steps"])
    original = load_image(spec["image"], size)
    Image.fromarray(original).save(folder / ORIGINAL_PNG)
    x0 = torch.from_numpy(original.copy()).permute(2, 0, 1)[None].float().div(255.0).to(device)

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # weights=None: a random backbone, on purpose in tests
        vit, _ = build_backbone(spec["backbone"], spec.get("weights"), image_size=size,
                                random_seed=spec.get("backbone_seed"))
    depth = len(vit.blocks)
    if not 1 <= block <= depth:
        raise ValueError(f"block {block}: the backbone {spec['backbone']} has blocks 1..{depth}")
    vit = vit.to(device).eval().requires_grad_(False)
    with torch.no_grad():
        target = block_tokens(vit, _normalise(x0), block)

    gen_cpu = torch.Generator().manual_seed(int(spec["seed"]))
    torch.manual_seed(int(spec["seed"]))  # the generator's initial weights
    net = SkipGenerator(int(spec["input_channels"]), int(spec["channels"]), int(spec["skip_channels"]),
                        int(spec["scales"])).to(device)
    z = torch.rand(1, int(spec["input_channels"]), size, size, generator=gen_cpu) * float(spec["input_scale"])
    opt = torch.optim.Adam(net.parameters(), lr=float(spec["lr"]))
    step, losses = 0, []
    state_path = folder / STATE_FILE
    if resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        gen_cpu.set_state(state["rng"])
        z, step, losses = state["z"], int(state["step"]), [float(v) for v in state["losses"]]
        log.info("%s: resuming at step %d/%d", folder, step, steps)
    z = z.to(device)
    net.train()
    start = time.time()
    while step < steps:
        noise = torch.randn(z.shape, generator=gen_cpu).to(device) * float(spec["reg_noise_std"])
        out = net(z + noise)
        loss = torch.mean((block_tokens(vit, _normalise(out), block) - target) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(loss.detach().item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{folder}: DIP loss is {losses[-1]} at step {step}")
        if step % int(spec["log_every"]) == 0 or step == steps:
            log.info("%s: step %d/%d loss %.5g", folder.name, step, steps, losses[-1])
        if step % int(spec["save_every"]) == 0 or step == steps or step == stop_after_step:
            rf.atomic_torch_save({"net": net.state_dict(), "opt": opt.state_dict(), "rng": gen_cpu.get_state(),
                                  "z": z.cpu(), "step": step, "losses": losses}, state_path)
        if stop_after_step is not None and step >= stop_after_step and step < steps:
            return {"step": step, "losses": losses}
    # Rendered as DIP's own code renders its result: the generator stays in training mode (BatchNorm
    # normalises with the statistics of this one image, never the running averages), fed the fixed
    # input z without the perturbation (inpainting.ipynb / feature_inversion.ipynb: `net(net_input)`
    # after `optimize`; DIP never calls net.eval()). The running averages this forward updates are
    # not used by anything.
    if spec.get("render", "train") not in ("train", "eval"):
        raise ValueError(f"{folder}: render must be 'train' or 'eval', got {spec['render']!r}")
    net.train(spec.get("render", "train") == "train")
    with torch.no_grad():
        recon = _to_u8(net(z))
    Image.fromarray(recon).save(folder / RECON_PNG)
    scores = image_scores(np.asarray(Image.open(folder / RECON_PNG).convert("RGB")), original)
    result = {"image": spec["image"], "backbone": spec["backbone"], "label": spec.get("label", spec["backbone"]),
              "weights": spec.get("weights"), "block": block, "steps": steps, **scores,
              "render": spec.get("render", "train"),
              "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
              "loss_curve": losses[:: max(1, len(losses) // 100)], "recon": RECON_PNG, "original": ORIGINAL_PNG,
              "time_s": round(time.time() - start, 2)}
    rf.write_json(folder / rf.RESULTS, result)
    return result

# -- the plan and the driver -----------------------------------------------------------------------
