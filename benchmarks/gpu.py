"""gpu: the GPU figures in one command (one JSON + one Markdown table), within a time budget.

    python benchmarks/gpu.py                          # on one H100/H200: < 8 min (default budget 420 s)
    python benchmarks/gpu.py --only train_step_compile --budget-s 420   # a section alone, e.g. the rest of a run
    python benchmarks/gpu.py --smoke --out /tmp/gpusmoke                 # the same code paths on CPU, tiny ViTs

Files: ``gpu.json`` and ``gpu.md`` in ``$OUT`` when that environment variable is set, else in
``--out`` (default ``runs/gpu``). Both are rewritten after every section (and every train-step
cell), so a run cut short keeps what it measured; sections not reached say ``pending``.

Models: MAE ViT-B/16 (``mae_vitb16``) and ViT-L/16 (``mae_vitl16``) with random weights at 224 px
(timing does not depend on the weights' values), 100 prompts, 100 classes. Methods: linear probing,
VPT-deep, gated + temperature (``method="gated", learn_temperature=True``). Batches 64 (FGVC) and
128 (VTAB). Precisions: ``fp32`` (TF32 off: the configs' ``train.precision: fp32``), ``tf32`` (fp32
tensors, TF32 matmuls and convolutions), ``bf16`` (autocast) and ``bf16+compile`` (autocast +
``torch.compile``, default mode, static shapes, one compile per cell, its time recorded apart).

Sections, in the order they run (each in its own try/except; once the budget is spent the rest are
recorded as skipped with the reason):

  environment         device name, peak FLOP/s used for MFU, torch / CUDA / timm versions, date
  flops               the FLOP count of every (backbone, method) below, from the formula in this file
  ddp                 a 2-process DDP step: skipped on one GPU, with the reason
  train_step          ViT-B/16: step time, images/s, MFU, peak memory; fp32, tf32, bf16
  eval_throughput     ViT-B/16 inference images/s (no grad), bf16 and fp32
  bf16_vs_fp32        200 steps of a gated + temperature run in fp32 and in bf16 (same seed, same data):
                      both loss curves, and the largest |logit difference| of one forward
  frozen_cache        vpt-at-block k=7: train epochs from cached block outputs vs all blocks
  linear_probe_cache  linear probing on cached pooled features vs the backbone every epoch
  segmentation        one SETR-PUP training iteration at 512x512, batch 16 (halved on OOM), fp32 and
                      bf16; one multi-scale (6 ratios) + flip sliding-window evaluation of a 512x683 image
  max_batch           ViT-B/16 gated + temperature: the largest training batch that fits, with and
                      without gradient checkpointing (gapt's ``model.grad_checkpointing``), bf16 and fp32
  train_step_vitl16, eval_throughput_vitl16, max_batch_vitl16    the same for ViT-L/16
  train_step_compile  bf16 + torch.compile cells, ViT-B/16 first, as many as the budget allows

MFU = counted model FLOPs of a step / step time / the device's dense peak at the step's precision
(bf16 and bf16+compile: bf16 tensor cores; tf32: TF32 tensor cores; fp32: non-tensor FP32). The FLOP
count is :func:`vit_flops` (the formula is written out there). On an unknown device MFU is omitted.
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks._common import Clock, build, paired, quiet, vit_name

JSON_NAME, MD_NAME = "gpu.json", "gpu.md"
T0 = time.perf_counter()  # the budget counts from here (torch is imported by then), not from Runner()

SECTIONS = ("environment", "flops", "ddp", "train_step", "eval_throughput", "bf16_vs_fp32", "frozen_cache",
            "linear_probe_cache", "segmentation", "max_batch", "train_step_vitl16", "eval_throughput_vitl16",
            "max_batch_vitl16", "train_step_compile")

PRECISIONS = ("fp32", "tf32", "bf16", "bf16+compile")

# (label, build_model keywords): the three methods timed
METHODS: Tuple[Tuple[str, Dict], ...] = (
    ("gated+temperature", dict(method="gated", learn_temperature=True, gate_init=5.0)),
    ("vpt-deep", dict(method="vpt-deep")),
    ("linear", dict(method="linear")),
)

# Dense (no sparsity) peak FLOP/s from NVIDIA's data sheets, in TFLOP/s. Checked in order: the first
# entry whose every substring is in torch.cuda.get_device_name() is used.
PEAK_TFLOPS: Tuple[Tuple[str, Tuple[str, ...], Dict[str, float]], ...] = (
    ("H200 NVL", ("H200", "NVL"), {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200 SXM", ("H200",), {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 PCIe", ("H100", "PCIE"), {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", ("H100", "NVL"), {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100 SXM", ("H100",), {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # "NVIDIA H100 80GB HBM3"
    ("A100", ("A100",), {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)


def peak_flops(device_name: str) -> Optional[Dict[str, object]]:
    """``{"entry": "H100 SXM", "bf16": FLOP/s, "tf32": ..., "fp32": ...}`` for a known GPU, else None
    (unknown device: MFU omitted)."""
    name = device_name.upper()
    for entry, needles, tflops in PEAK_TFLOPS:
        if all(n in name for n in needles):
            return {"entry": entry, **{k: v * 1e12 for k, v in tflops.items()}}
    return None


def peak_key(precision: str) -> str:
    """Which peak a step at ``precision`` is measured against."""
    return {"fp32": "fp32", "tf32": "tf32"}.get(precision, "bf16")


# -- the FLOP count -------------------------------------------------------------------------------
@dataclass(frozen=True)
class VitDims:
    """What the FLOP count needs to know about a prompted ViT."""
    depth: int
    dim: int          # D
    hidden: int       # MLP hidden width H (4 D for these ViTs)
    patches: int      # (image / patch)^2: 196 at 224 px, patch 16
    patch_dim: int    # 3 * patch^2, the patch-embedding convolution's reduction
    prefix: int       # CLS (+ registers): 1 for MAE
    prompts: int      # prompt tokens (0 for linear)
    classes: int
    method: str
    insert_at_block: int = 1


def dims_of(model) -> VitDims:
    vit = model.backbone
    patches = int(vit.patch_embed.num_patches) if model.image_size == vit.patch_embed.img_size[0] else \
        (model.image_size // model.patch_size) ** 2
    head = model.head
    classes = head.out_features if isinstance(head, nn.Linear) else 0
    return VitDims(depth=model.depth, dim=model.embed_dim, hidden=vit.blocks[0].mlp.fc1.out_features,
                   patches=patches, patch_dim=vit.patch_embed.proj.in_channels * model.patch_size ** 2,
                   prefix=vit.num_prefix_tokens, prompts=model.num_prompts, classes=classes, method=model.method,
                   insert_at_block=model.insert_at_block)


def block_forward_flops(n: int, d: int, h: int) -> int:
    """One transformer block's forward, per image, N tokens, width D, MLP hidden H (matmul FLOPs, 2 per MAC):

        qkv   2 N D (3D)      attention scores  2 N^2 D  (Q K^T: heads x 2 N N (D / heads))
        proj  2 N D D         attention values  2 N^2 D  (softmax(.) V)
        fc1   2 N D H         fc2               2 N H D

    = 2 N D (3D + D + 2H) + 4 N^2 D  = 24 N D^2 + 4 N^2 D  for H = 4D.
    """
    return 2 * n * d * (3 * d + d + 2 * h) + 4 * n * n * d


def block_backward_flops(n: int, d: int, h: int) -> int:
    """Backward of one *frozen* block when a gradient must reach its input (prompts enter at or before it):
    no weight gradients; each linear layer's input gradient dX = dY W^T costs as much as its forward
    (2 N D (3D + D + 2H)); in attention both operands of Q K^T and of P V are activations, so each of
    the two products needs two gradient products (2 x 2 x 2 N^2 D = 8 N^2 D).

    = 24 N D^2 + 8 N^2 D  for H = 4D. Flash attention also recomputes Q K^T in its backward
    (+2 N^2 D, hardware FLOPs); MFU counts model FLOPs, so that recompute is not counted."""
    return 2 * n * d * (3 * d + d + 2 * h) + 8 * n * n * d


def vit_flops(dims: VitDims) -> Dict[str, int]:
    """Forward, backward and train-step FLOPs per image of a prompted ViT (matmul and convolution FLOPs;
    softmax, LayerNorm, GELU, residual adds and the gate mix are O(N D) and not counted):

        tokens       N0 = prefix + patches (1 + 196), N = N0 + prompts (1 + 196 + 100 for 100 prompts)
        forward      2 patches (3 p^2) D                     patch embedding (convolution)
                   + sum over blocks of block_forward(N_l)   N_l = N0 before the prompts enter, N from there
                   + 2 D C                                   head
        backward     linear probe: 2 D C (head weight gradient only; no block needs a gradient)
                     prompt methods: sum over the blocks from the prompts' entry block on of
                     block_backward(N) (input gradients of frozen blocks, no weight gradients)
                     + 2 D C (head weight) + 2 D C (head input); nothing before the entry block and
                     not the patch embedding (no tensor there is trained)
        step         forward + backward (the SGD update is O(tuned parameters), not counted)
    """
    if dims.method == "full":
        raise ValueError("vit_flops counts frozen backbones; method 'full' also has weight gradients")
    d, h = dims.dim, dims.hidden
    n0 = dims.prefix + dims.patches
    n = n0 + dims.prompts
    entry = (dims.insert_at_block if dims.method == "vpt-at-block" else 1) if dims.prompts else dims.depth + 1
    tokens = [n0 if i + 1 < entry else n for i in range(dims.depth)]
    forward = 2 * dims.patches * dims.patch_dim * d + sum(block_forward_flops(t, d, h) for t in tokens) \
        + 2 * d * dims.classes
    backward = 2 * d * dims.classes
    if dims.prompts:
        backward += sum(block_backward_flops(t, d, h) for i, t in enumerate(tokens) if i + 1 >= entry)
        backward += 2 * d * dims.classes
    return {"tokens": n, "forward": forward, "backward": backward, "step": forward + backward}


# -- plan -----------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Every size the run uses; ``full_plan`` for a GPU, ``smoke_plan`` for the CPU check."""
    smoke: bool
    backbones: Dict[str, object]           # "vitb16" / "vitl16" -> gapt backbone name (or BackboneSpec)
    num_prompts: int = 100
    num_classes: int = 100
    batches: Tuple[Tuple[str, int], ...] = (("FGVC", 64), ("VTAB", 128))
    warmup: int = 2
    min_time_s: float = 1.0                # timed work per cell, split in `repeats` chunks
    repeats: int = 3
    max_steps: int = 50                    # per chunk
    eval_batch: int = 256
    maxbatch_start: int = 32
    maxbatch_cap: Dict[str, int] = field(default_factory=lambda: {"vitb16": 4096, "vitl16": 2048})
    maxbatch_probes: int = 10
    maxbatch_search_s: float = 35.0
    cpu_capacity_bytes: int = 0            # CPU (smoke): the simulated device memory of the batch search
    curve_steps: int = 200
    curve_batch: int = 32
    curve_images: int = 256
    curve_lr: float = 0.01
    curve_classes: int = 10
    cache_k: int = 7
    cache_prompts: int = 10
    cache_images: int = 512
    cache_batch: int = 64
    cache_repeats: int = 3
    lp_epochs: int = 10
    seg_backbone: str = "vitb16"
    seg_crop: int = 512
    seg_image: Tuple[int, int] = (512, 683)
    seg_batch: int = 16
    seg_iters: int = 3
    seg_classes: int = 150                 # ADE20K
    seg_prompts: int = 100                 # configs/ade20k/mae_vitb16.yaml: gated, 100 prompts
    seg_channels: int = 256                # SETR-PUP
    seg_precisions: Tuple[str, ...] = ("bf16", "fp32")
    compile_backend: str = "inductor"
    compile_cells: Optional[int] = None    # None: every cell the budget allows
    compile_start: int = 0                 # skip the first cells of the order (done by an earlier run)
    # before a backbone's first compile: its expected compile time (dynamo unrolls the blocks, so ViT-L's
    # 24 take about twice ViT-B's 12); after it: 1.25 x the slowest compile of that backbone so far
    first_compile_estimate_s: Dict[str, float] = field(default_factory=lambda: {"vitb16": 90.0, "vitl16": 180.0})
    cell_estimate_s: float = 3.0


def full_plan() -> Plan:
    return Plan(smoke=False, backbones={"vitb16": "mae_vitb16", "vitl16": "mae_vitl16"})


def smoke_backbones() -> Dict[str, object]:
    """Tiny stand-ins for ViT-B and ViT-L (32 px, patch 8: 16 patches)."""
    from gapt.model import BackboneSpec
    def spec(name, dim, depth, heads):
        return BackboneSpec(name, dict(patch_size=8, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4.0,
                                       qkv_bias=True), "mean", "mae", image_size=32)
    return {"vitb16": spec("gpu_smoke_b", 32, 2, 2), "vitl16": spec("gpu_smoke_l", 48, 3, 3)}


def smoke_plan() -> Plan:
    return Plan(smoke=True, backbones=smoke_backbones(), num_prompts=4, num_classes=5,
                batches=(("FGVC", 4), ("VTAB", 8)), warmup=1, min_time_s=0.02, repeats=2, max_steps=3,
                eval_batch=8, maxbatch_start=2, maxbatch_cap={"vitb16": 256, "vitl16": 128}, maxbatch_probes=10,
                maxbatch_search_s=20.0, cpu_capacity_bytes=1_500_000, curve_steps=30, curve_batch=8,
                curve_images=32, curve_lr=0.05, cache_k=2, cache_prompts=2, cache_images=4, cache_batch=2,
                cache_repeats=1, lp_epochs=2, seg_crop=32, seg_image=(32, 43), seg_batch=2, seg_iters=1,
                seg_classes=5, seg_prompts=4, seg_channels=16, compile_backend="aot_eager", compile_cells=1,
                first_compile_estimate_s={"vitb16": 20.0, "vitl16": 20.0}, cell_estimate_s=0.5)


# -- small helpers --------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Drop unreachable tensors and the allocator's cache between measurements (CUDA; on CPU
    reference counting already frees them). main() freezes the objects made before the run
    (``gc.freeze``), so a collection walks only what the run created."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text.lower() or "ALLOC_FAILED" in text)


@contextlib.contextmanager
def precision_mode(precision: str):
    """TF32 switches for ``precision`` (restored after); yields the autocast dtype (None: no autocast).
    fp32 and bf16 run with TF32 off, so any fp32 matmul left under autocast is exact fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {PRECISIONS}")
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield torch.bfloat16 if precision.startswith("bf16") else None
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def autocast(device: torch.device, amp: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


def time_fn(fn: Callable[[], object], device: torch.device, plan: Plan, warmup: Optional[int] = None
            ) -> Tuple[float, Dict]:
    """Median seconds per call: ``warmup`` calls, one probe call, then ``repeats`` chunks of calls sized
    so that all chunks together take about ``plan.min_time_s``; wall time, synchronised at chunk ends."""
    for _ in range(plan.warmup if warmup is None else warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    chunk = max(1, min(plan.max_steps, math.ceil(plan.min_time_s / plan.repeats / one)))
    per_call = []
    for _ in range(plan.repeats):
        t0 = time.perf_counter()
        for _ in range(chunk):
            fn()
        sync(device)
        per_call.append((time.perf_counter() - t0) / chunk)
    return statistics.median(per_call), {"per_call_s": per_call, "calls_per_chunk": chunk, "chunks": plan.repeats}


def tuned(model) -> List[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_step_fn(forward: Callable, model, images: torch.Tensor, labels: torch.Tensor,
                  amp: Optional[torch.dtype], lr: float = 1e-3) -> Callable[[], torch.Tensor]:
    """forward + cross-entropy + backward + SGD (momentum) step over the tuned tensors (train_step.py's)."""
    from benchmarks.train_step import make_step
    return make_step(forward, tuned(model), images, labels, amp)


def random_batch(batch: int, image_size: int, classes: int, device: torch.device, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=g)
    labels = torch.randint(0, classes, (batch,), generator=g)
    return images.to(device), labels.to(device)


def jsonable(x):
    """JSON-safe copy: dataclasses to dicts, tuples to lists, NaN/inf to None, tensors to numbers."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return jsonable(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return jsonable(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


# -- the run: sections, budget, files ---------------------------------------------------------------
def _secs(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.1f}"


class Skip(Exception):
    """Raised inside a section or cell: recorded as skipped with this reason."""


class Runner:
    def __init__(self, plan: Plan, device: torch.device, out_dir: Path, budget_s: float,
                 selected: Sequence[str], argv: Sequence[str] = (), t0: Optional[float] = None):
        """``t0``: when the budget's clock started (main: the script's import; default: now)."""
        self.plan, self.device, self.out_dir, self.budget_s = plan, device, out_dir, budget_s
        self.selected = set(selected)
        self.t0 = time.perf_counter() if t0 is None else t0
        self.peak: Optional[Dict[str, object]] = None
        self.compile_seen: Dict[str, List[float]] = {}
        self.doc: Dict[str, object] = {
            "script": "benchmarks/gpu.py", "argv": list(argv), "smoke": plan.smoke, "device": str(device),
            "budget": {"budget_s": budget_s, "elapsed_s": 0.0},
            "sections": {k: {"status": "pending"} for k in SECTIONS}}
        out_dir.mkdir(parents=True, exist_ok=True)

    # time
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def budget_note(self, seconds: float, what: str) -> str:
        return (f"time budget: {_secs(max(self.left(), 0.0))} s of {_secs(self.budget_s)} s left, {what} needs "
                f"about {_secs(seconds)} s")

    def need(self, seconds: float, what: str) -> None:
        """Skip ``what`` unless about ``seconds`` of the budget are left."""
        if self.left() < seconds:
            raise Skip(self.budget_note(seconds, what))

    def log(self, msg: str) -> None:
        print(f"[gpu.py {self.elapsed():6.1f}s] {msg}", flush=True)

    # files
    def write(self) -> None:
        self.doc["budget"]["elapsed_s"] = round(self.elapsed(), 2)
        data = json.dumps(jsonable(self.doc), indent=1)
        tmp = self.out_dir / (JSON_NAME + ".tmp")
        tmp.write_text(data)
        os.replace(tmp, self.out_dir / JSON_NAME)
        tmp = self.out_dir / (MD_NAME + ".tmp")
        tmp.write_text(markdown(self.doc))
        os.replace(tmp, self.out_dir / MD_NAME)

    def section(self, key: str, fn: Callable[["Runner"], Dict], min_s: float = 0.0) -> None:
        record: Dict[str, object]
        if key not in self.selected:
            record = {"status": "skipped", "reason": "not selected (--only / --skip)"}
        elif self.left() < min_s:
            record = {"status": "skipped", "reason": self.budget_note(min_s, "the section")}
        else:
            self.log(f"{key}: start")
            self.doc["sections"][key] = record = {"status": "running"}
            start = time.perf_counter()
            try:
                record.update(fn(self) or {})
                record["status"] = "ok"
            except Skip as e:
                record.update(status="skipped", reason=str(e))
            except Exception as e:  # noqa: BLE001 - one section's failure must not stop the others
                record.update(status="failed", error=f"{type(e).__name__}: {e}",
                              traceback=traceback.format_exc()[-3000:])
            record["seconds"] = round(time.perf_counter() - start, 2)
            free_memory(self.device)
        self.doc["sections"][key] = record
        self.log(f"{key}: {record['status']}" + (f" ({record.get('reason') or record.get('error')})"
                                                 if record["status"] != "ok" else f" in {record['seconds']} s"))
        self.write()


# -- sections -------------------------------------------------------------------------------------
def environment(r: Runner) -> Dict:
    import timm
    import gapt
    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda, "timm": timm.__version__,
           "gapt": gapt.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if r.device.type == "cuda":
        props = torch.cuda.get_device_properties(r.device)
        env.update(device_name=torch.cuda.get_device_name(r.device), capability=f"{props.major}.{props.minor}",
                   memory_bytes=props.total_memory, device_count=torch.cuda.device_count(),
                   cudnn=torch.backends.cudnn.version())
        r.peak = peak_flops(env["device_name"])
    else:
        env.update(device_name=f"cpu ({platform.processor() or platform.machine()})")
    env["peak_flops"] = r.peak or "unknown: MFU omitted"
    r.doc["environment_summary"] = env  # also kept outside the section, for the table's header
    return env


def flops_section(r: Runner) -> Dict:
    """The formula's counts for every (backbone, method) timed, per image (built on the meta device)."""
    rows = []
    for key, backbone in r.plan.backbones.items():
        for label, kw in METHODS:
            with torch.device("meta"):
                model = build(backbone, num_prompts=r.plan.num_prompts, num_classes=r.plan.num_classes, **kw)
            f = vit_flops(dims_of(model))
            rows.append({"backbone": key, "model": vit_name(model), "method": label, **f})
    return {"per_image": rows, "formula": vit_flops.__doc__.strip(),
            "block_forward": block_forward_flops.__doc__.strip(),
            "block_backward": block_backward_flops.__doc__.strip()}


def ddp_section(r: Runner) -> Dict:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    raise Skip(f"a 2-process DDP step needs two GPUs (NCCL runs one process per device); this machine has {n}. "
               "gapt's DDP path is tested on CPU with gloo (tests/test_engine.py); run `torchrun --nproc_per_node 2 "
               "-m gapt train ...` on a 2-GPU machine to time it")


class Models:
    """One random backbone per name, shared by the methods' models (only prompts and head differ)."""

    def __init__(self, r: Runner):
        self.r = r
        self.bases: Dict[str, object] = {}

    def get(self, key: str, method_kw: Dict, num_prompts: Optional[int] = None, num_classes: Optional[int] = None):
        from gapt.model import PromptedViT
        plan = self.r.plan
        if key not in self.bases:
            self.bases = {}  # one backbone at a time on the device
            free_memory(self.r.device)
            base = build(plan.backbones[key], method="linear", num_classes=plan.num_classes)
            self.bases[key] = base.to(self.r.device)
        base = self.bases[key]
        torch.manual_seed(0)
        kw = dict(method_kw)
        model = PromptedViT(base.backbone, num_prompts=num_prompts or plan.num_prompts,
                            num_classes=num_classes or plan.num_classes, backbone_name=base.backbone_name,
                            image_size=base.image_size, pooling=base.pooling, **kw)
        return model.to(self.r.device)


def train_cell(r: Runner, models: Models, key: str, label: str, method_kw: Dict, batch: int, batch_of: str,
               precision: str) -> Dict:
    device, plan = r.device, r.plan
    cell = {"backbone": key, "method": label, "batch": batch, "batch_of": batch_of, "precision": precision}
    compiled = precision == "bf16+compile"
    try:
        if compiled:
            seen = r.compile_seen.get(key)
            estimate = 1.25 * max(seen) if seen else plan.first_compile_estimate_s[key]
            how = "1.25 x the slowest compile of this backbone so far" if seen else "first compile"
            r.need(estimate, f"a torch.compile cell (estimate: {how})")
        else:
            r.need(plan.cell_estimate_s, "a cell")
        model = models.get(key, method_kw)
        cell["model"] = vit_name(model)
        f = vit_flops(dims_of(model))
        cell.update(tokens=f["tokens"], flops_per_image=f["step"], flops_per_step=f["step"] * batch)
        images, labels = random_batch(batch, model.image_size, model.num_classes, device)
        model.train()
        free_memory(device)
        with precision_mode(precision) as amp:
            forward = model
            if compiled:
                import torch._dynamo
                from torch._dynamo.utils import counters
                torch._dynamo.reset()  # a fresh cache: no recompile limit reached across cells
                graphs0 = counters["stats"]["unique_graphs"]
                breaks0 = sum(counters["graph_break"].values())
                forward = torch.compile(model, backend=plan.compile_backend, dynamic=False)
                step = train_step_fn(forward, model, images, labels, amp)
                t0 = time.perf_counter()
                step()
                sync(device)
                first = time.perf_counter() - t0
                cell.update(compile_backend=plan.compile_backend, first_step_s=first,
                            graphs=int(counters["stats"]["unique_graphs"] - graphs0),
                            graph_breaks=int(sum(counters["graph_break"].values()) - breaks0))
            else:
                step = train_step_fn(forward, model, images, labels, amp)
            if device.type == "cuda":
                sync(device)
                cell["resident_bytes"] = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            step_s, timing = time_fn(step, device, plan)
            if device.type == "cuda":
                cell["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
            else:
                cell["peak_mem_bytes"] = None
                cell["peak_mem_note"] = "cpu: not measured (the max_batch section counts CPU tensor bytes)"
        if compiled:
            cell["compile_s"] = max(cell["first_step_s"] - step_s, 0.0)
            r.compile_seen.setdefault(key, []).append(cell["first_step_s"])
        achieved = cell["flops_per_step"] / step_s
        cell.update(status="ok", step_ms=step_s * 1e3, images_per_s=batch / step_s, tflops_per_s=achieved / 1e12,
                    timing=timing)
        if r.peak is not None:
            cell["peak_tflops"] = r.peak[peak_key(precision)] / 1e12
            cell["mfu"] = achieved / r.peak[peak_key(precision)]
        if device.type == "cpu" and precision == "tf32":
            cell["note"] = "TF32 does not exist on CPU: the same as fp32 there"
    except Skip as e:
        cell.update(status="skipped", reason=str(e))
    except Exception as e:  # noqa: BLE001 - one cell's failure (OOM, compile error) is recorded, the rest run
        cell.update(status="failed", error=f"{type(e).__name__}: {str(e)[:500]}",
                    oom=is_oom(e), traceback=traceback.format_exc()[-2000:])
    finally:
        free_memory(device)
    r.log(f"  train {key} {label} batch {batch} {precision}: " + (
        f"{cell['step_ms']:.1f} ms/step, {cell['images_per_s']:.0f} img/s"
        + (f", MFU {100 * cell['mfu']:.1f}%" if cell.get("mfu") is not None else "")
        if cell["status"] == "ok" else f"{cell['status']} ({cell.get('reason') or cell.get('error')})"))
    return cell


def train_cells(r: Runner, key: str, precisions: Sequence[str], section: str,
                order: Optional[List[Tuple[str, Dict, str, int]]] = None) -> Dict:
    """Every (method, batch, precision) cell of one backbone; the list is written after each cell."""
    models = Models(r)
    cells: List[Dict] = []
    r.doc["sections"][section]["cells"] = cells
    plan_cells = order or [(label, kw, of, b) for label, kw in METHODS for of, b in r.plan.batches]
    for label, kw, batch_of, batch in plan_cells:
        for precision in precisions:
            cells.append(train_cell(r, models, key, label, kw, batch, batch_of, precision))
            r.write()
    ok = [c for c in cells if c["status"] == "ok"]
    if not ok:
        raise RuntimeError("no train-step cell ran: " + "; ".join(
            str(c.get("reason") or c.get("error")) for c in cells[:3]))
    return {"cells": cells}


def train_step_section(key: str):
    def run(r: Runner) -> Dict:
        return train_cells(r, key, ("fp32", "tf32", "bf16"), f"train_step{'' if key == 'vitb16' else '_' + key}")
    return run


def compile_section(r: Runner) -> Dict:
    """bf16 + torch.compile cells, ViT-B/16 first, gated + temperature first; from cell ``compile_start``
    of that order, at most ``compile_cells`` of them."""
    cells: List[Dict] = []
    r.doc["sections"]["train_step_compile"]["cells"] = cells
    start, limit = r.plan.compile_start, r.plan.compile_cells
    for key in r.plan.backbones:
        models = Models(r)
        for label, kw in METHODS:
            for batch_of, batch in r.plan.batches:
                index = len(cells)
                skip = None
                if index < start:
                    skip = f"--compile-start {start}: cell {index} of the order is left to an earlier run"
                elif limit is not None and index - start >= limit:
                    skip = f"--compile-cells {limit}: only {limit} compiled"
                if skip:
                    cells.append({"backbone": key, "method": label, "batch": batch, "batch_of": batch_of,
                                  "precision": "bf16+compile", "status": "skipped", "reason": skip})
                else:
                    cells.append(train_cell(r, models, key, label, kw, batch, batch_of, "bf16+compile"))
                r.write()
    if not any(c["status"] == "ok" for c in cells):
        raise RuntimeError("no compiled cell ran: " + "; ".join(
            str(c.get("reason") or c.get("error")) for c in cells[:3]))
    return {"cells": cells, "compile_backend": r.plan.compile_backend}


def eval_section(key: str):
    def run(r: Runner) -> Dict:
        device, plan = r.device, r.plan
        models = Models(r)
        cells = []
        for label, kw in METHODS[:1] + METHODS[2:]:  # gated + temperature, linear
            model = models.get(key, kw).eval()
            images, _ = random_batch(plan.eval_batch, model.image_size, model.num_classes, device)
            for precision in ("bf16", "fp32"):
                cell = {"backbone": key, "model": vit_name(model), "method": label, "batch": plan.eval_batch,
                        "precision": precision}
                try:
                    r.need(plan.cell_estimate_s, "an eval cell")
                    with precision_mode(precision) as amp:
                        def forward():
                            with torch.inference_mode(), autocast(device, amp):
                                model(images)
                        batch_s, timing = time_fn(forward, device, plan)
                    f = vit_flops(dims_of(model))["forward"] * plan.eval_batch
                    cell.update(status="ok", images_per_s=plan.eval_batch / batch_s, ms_per_batch=batch_s * 1e3,
                                tflops_per_s=f / batch_s / 1e12, timing=timing)
                    if r.peak is not None:
                        cell["mfu"] = f / batch_s / r.peak[peak_key(precision)]
                except Skip as e:
                    cell.update(status="skipped", reason=str(e))
                except Exception as e:  # noqa: BLE001
                    cell.update(status="failed", error=f"{type(e).__name__}: {str(e)[:500]}", oom=is_oom(e))
                r.log(f"  eval {key} {label} {precision}: " + (f"{cell['images_per_s']:.0f} img/s"
                                                               if cell["status"] == "ok" else cell["status"]))
                cells.append(cell)
            model = images = None
            free_memory(device)
        if not any(c["status"] == "ok" for c in cells):
            raise RuntimeError("no eval cell ran")
        return {"cells": cells}
    return run


def bf16_vs_fp32(r: Runner) -> Dict:
    """The same gated + temperature run (same initial tensors, data, order and dropout masks) in fp32
    (TF32 off) and in bf16 autocast: every step's loss, and one forward's logits."""
    device, plan = r.device, r.plan
    models = Models(r)
    label, kw = METHODS[0]
    model = models.get("vitb16", kw, num_classes=plan.curve_classes)
    start = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    g = torch.Generator().manual_seed(2)
    images = torch.randn(plan.curve_images, 3, model.image_size, model.image_size, generator=g).to(device)
    labels = torch.randint(0, plan.curve_classes, (plan.curve_images,), generator=g).to(device)
    batches = max(1, plan.curve_images // plan.curve_batch)

    def reset():
        with torch.no_grad():
            for k, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(start[k])

    logits = {}
    model.eval()
    for precision in ("fp32", "bf16"):
        with precision_mode(precision) as amp, torch.no_grad(), autocast(device, amp):
            logits[precision] = model(images[:plan.curve_batch]).float()
    diff = (logits["bf16"] - logits["fp32"]).abs()
    scale = logits["fp32"].abs().max().item()
    out: Dict[str, object] = {
        "model": vit_name(model), "method": label, "steps": plan.curve_steps, "batch": plan.curve_batch,
        "images": plan.curve_images, "classes": plan.curve_classes, "lr": plan.curve_lr,
        "optimizer": "SGD momentum 0.9", "logits": {
            "max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(), "max_abs_fp32": scale,
            "relative_max_diff": diff.max().item() / max(scale, 1e-12),
            "argmax_agreement": (logits["bf16"].argmax(1) == logits["fp32"].argmax(1)).float().mean().item(),
            "batch": plan.curve_batch}}
    curves, finals = {}, {}
    for precision in ("fp32", "bf16"):
        r.need(1.0, f"the {precision} curve")
        reset()
        model.train()
        torch.manual_seed(3)  # the same prompt-dropout masks in both runs
        opt = torch.optim.SGD(tuned(model), lr=plan.curve_lr, momentum=0.9)
        losses = []
        t0 = time.perf_counter()
        with precision_mode(precision) as amp:
            for s in range(plan.curve_steps):
                i = s % batches
                x = images[i * plan.curve_batch:(i + 1) * plan.curve_batch]
                y = labels[i * plan.curve_batch:(i + 1) * plan.curve_batch]
                with autocast(device, amp):
                    loss = F.cross_entropy(model(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.detach())
        curve = torch.stack(losses).cpu()
        sync(device)
        curves[precision] = curve
        finals[precision] = {k: p.detach().float().clone() for k, p in model.named_parameters() if p.requires_grad}
        out[f"seconds_{precision}"] = time.perf_counter() - t0
        r.log(f"  {precision}: loss {curve[0].item():.4f} -> {curve[-1].item():.4f}")
    d = (curves["bf16"] - curves["fp32"]).abs()
    last = max(1, plan.curve_steps // 10)
    out.update(loss_fp32=[round(v, 6) for v in curves["fp32"].tolist()],
               loss_bf16=[round(v, 6) for v in curves["bf16"].tolist()],
               loss_max_abs_diff=d.max().item(),
               loss_max_rel_diff=(d / curves["fp32"].abs().clamp_min(1e-12)).max().item(),
               loss_mean_abs_diff_last=d[-last:].mean().item(), last_steps=last,
               loss_first={"fp32": curves["fp32"][0].item(), "bf16": curves["bf16"][0].item()},
               loss_final={"fp32": curves["fp32"][-last:].mean().item(), "bf16": curves["bf16"][-last:].mean().item()},
               tuned_max_abs_diff={k: (finals["bf16"][k] - finals["fp32"][k]).abs().max().item()
                                   for k in finals["fp32"]})
    return out


def frozen_cache_section(r: Runner) -> Dict:
    """benchmarks/frozen_cache.py's measurement (engine ``precompute_frozen`` + ``train_one_epoch`` from the
    cache vs all blocks, paired timing), at the GPU precision. Written out here rather than calling
    ``frozen_cache.run_one`` because that one checks the cached logits against an fp32 forward to
    1e-3 while its cache is built in bf16 on CUDA (max |diff| about 0.08 on logits of size 30 for
    ViT-B/16 at k=7, so it raises there); here both sides of the check run under the same autocast."""
    from torch.utils.data import DataLoader, TensorDataset
    from gapt.engine.schedule import LRSchedule
    from gapt.engine.trainer import evaluate, precompute_frozen, train_one_epoch
    device, plan = r.device, r.plan
    k = plan.cache_k
    amp = torch.bfloat16  # the GPU default (train.precision auto); bf16 autocast on CPU in --smoke
    clock = Clock("wall", device)
    model = build(plan.backbones["vitb16"], method="vpt-at-block", insert_at_block=k, num_prompts=plan.cache_prompts,
                  num_classes=10).to(device)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(plan.cache_images, 3, model.image_size, model.image_size, generator=g)
    data = TensorDataset(images, torch.randint(0, 10, (plan.cache_images,), generator=g))
    batch = plan.cache_batch
    model.eval()
    with quiet(), precision_mode("bf16"):
        precompute_frozen(model, TensorDataset(images[:batch], data.tensors[1][:batch]), batch, device, amp, "warm-up")
        sync(device)
        t0 = time.perf_counter()
        cached = precompute_frozen(model, data, batch, device, amp, "cache frozen blocks")
        sync(device)
        build_s = time.perf_counter() - t0
        with torch.no_grad(), autocast(device, amp):
            full = model(images[:batch].to(device)).float()
            from_cache = model.forward_from_frozen(cached.tensors[0][:batch].to(device)).float()
        diff = (from_cache - full).abs().max().item()
        if not diff <= 1e-2 * max(1.0, full.abs().max().item()):
            raise AssertionError(f"forward_from_frozen differs from forward under the same autocast by {diff:.3g}")
        full_loader = DataLoader(data, batch_size=batch, shuffle=False)
        cached_loader = DataLoader(cached, batch_size=batch, shuffle=False)
        opt = torch.optim.SGD(tuned(model), lr=1e-3, momentum=0.9)
        schedule = LRSchedule(1e-3, 100, 0, len(full_loader))

        def epoch(forward, loader):
            return lambda: train_one_epoch(model, forward, loader, opt, schedule, 50, device, amp)

        def val(forward, dataset):
            return lambda: evaluate(forward, dataset, batch, device, amp, desc="val")
        t = paired(epoch(model, full_loader), epoch(model.forward_from_frozen, cached_loader), plan.cache_repeats,
                   clock)
        model.eval()
        v = paired(val(model, data), val(model.forward_from_frozen, cached), plan.cache_repeats, clock)
    L = model.depth
    ideal = t.baseline_s / max(t.baseline_s - build_s, 1e-12)
    return {"ratio": t.ratio, "val_ratio": v.ratio, "ideal": ideal, "target": L / (L - k + 1) * 0.8,
            "insert_at_block": k, "depth": L, "model": vit_name(model), "prompts": plan.cache_prompts,
            "images": plan.cache_images, "batch": batch, "precision": "bf16 autocast", "build_s": build_s,
            "epoch_s_all_blocks": t.baseline_s, "epoch_s_cached": t.candidate_s, "spread": t.spread(),
            "logit_diff_same_autocast": diff, "timing": t, "val_timing": v}


def linear_probe_cache_section(r: Runner) -> Dict:
    """benchmarks/linear_probe_cache.py's ``run`` as it is (bf16 autocast on CUDA, fp32 on CPU)."""
    from benchmarks import linear_probe_cache
    plan = r.plan
    with precision_mode("fp32"):
        res = linear_probe_cache.run(quick=plan.smoke, device=r.device, clock=Clock("wall", r.device),
                                     backbone=plan.backbones["vitb16"], epochs=plan.lp_epochs,
                                     num_images=plan.cache_images, batch=plan.cache_batch,
                                     repeats=max(1, plan.cache_repeats - 1))[0]
    if res.ratio is None:
        raise RuntimeError(res.line())
    return {"ratio": res.ratio, "line": res.line(), "detail": res.detail, "timing": res.extra.get("timing"),
            "epochs": plan.lp_epochs, "images": plan.cache_images, "batch": plan.cache_batch}


def segmentation(r: Runner) -> Dict:
    """gapt.seg's SETR-PUP model (built as ``gapt.seg.model.build_seg_model`` does, without a config)
    on the ADE20K config's encoder (gated, 100 prompts, 150 classes, position embeddings at the crop,
    bilinear): training iterations (``seg_loss``, SGD with the heads at 10x lr), then one multi-scale
    + flip sliding-window evaluation (``multiscale_inference``) of one image."""
    from gapt.seg import MS_RATIOS, SegmentationModel, multiscale_inference, seg_loss, slide_windows
    from gapt.seg.model import SEG_POS_EMBED_INTERPOLATION, aux_blocks_for_depth
    from gapt.seg.recipe import slide_stride, train_scale
    from gapt.seg.transforms import scaled_size
    device, plan = r.device, r.plan
    crop = plan.seg_crop
    encoder = build(plan.backbones[plan.seg_backbone], method="gated", num_prompts=plan.seg_prompts, gate_init=10.0,
                    num_classes=plan.seg_classes, image_size=crop, pos_embed_interpolation=SEG_POS_EMBED_INTERPOLATION)
    encoder.head = nn.Identity()
    encoder.backbone.norm.requires_grad_(False)
    model = SegmentationModel(encoder, plan.seg_classes, aux_blocks=aux_blocks_for_depth(encoder.depth),
                              channels=plan.seg_channels).to(device)
    out: Dict[str, object] = {"model": f"SETR-PUP on {vit_name(encoder)} gated, {plan.seg_prompts} prompts",
                              "classes": plan.seg_classes, "aux_blocks": list(model.aux_blocks), "crop": crop}
    train_rows = []
    for precision in plan.seg_precisions:
        batch = plan.seg_batch
        row: Dict[str, object] = {"precision": precision, "requested_batch": batch, "oom_at": []}
        while True:
            try:
                r.need(plan.cell_estimate_s, f"a segmentation {precision} iteration")
                opt = torch.optim.SGD(model.param_groups(1e-3, 10.0), lr=1e-3, momentum=0.9)
                g = torch.Generator().manual_seed(4)
                images = torch.randn(batch, 3, crop, crop, generator=g).to(device)
                labels = torch.randint(0, plan.seg_classes, (batch, crop, crop), generator=g).to(device)
                model.train()
                with precision_mode(precision) as amp:
                    def iteration():
                        with autocast(device, amp):
                            loss = seg_loss(model(images), labels)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        return loss
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    t0 = time.perf_counter()
                    loss = iteration()
                    sync(device)
                    first = time.perf_counter() - t0
                    times = []
                    for _ in range(plan.seg_iters):
                        t0 = time.perf_counter()
                        loss = iteration()
                        sync(device)
                        times.append(time.perf_counter() - t0)
                it_s = statistics.median(times)
                row.update(status="ok", batch=batch, first_iteration_s=first, iteration_s=it_s,
                           iterations_timed=len(times),
                           images_per_s=batch / it_s, loss=loss.item(),
                           peak_mem_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
                break
            except Exception as e:  # noqa: BLE001
                if isinstance(e, Skip):
                    row.update(status="skipped", reason=str(e))
                    break
                oom = is_oom(e)
                if oom and batch > 1:
                    row["oom_at"].append(batch)
                    batch //= 2
                    opt = images = labels = None
                    for p in model.parameters():
                        p.grad = None
                    free_memory(device)
                    continue
                row.update(status="failed", error=f"{type(e).__name__}: {str(e)[:500]}", oom=oom)
                break
            finally:
                opt = images = labels = None
                for p in model.parameters():
                    p.grad = None
                free_memory(device)
        r.log(f"  seg train {precision}: " + (f"batch {row['batch']}, {row['iteration_s']:.3f} s/iteration"
                                              if row["status"] == "ok" else row["status"]))
        train_rows.append(row)
    out["train"] = train_rows

    # one image, multi-scale + flip, sliding windows (the ADE20K evaluation's `--multi-scale`)
    h, w = plan.seg_image
    base, stride = train_scale(crop), slide_stride(crop)
    windows = sum(len(slide_windows(*scaled_size(h, w, ratio, base), crop, stride)) for ratio in MS_RATIOS)
    ev: Dict[str, object] = {"image": [h, w], "ratios": list(MS_RATIOS), "flip": True, "base_scale": list(base),
                             "crop": crop, "stride": stride, "forward_passes": 2 * windows}
    evals = []
    model.eval()
    image = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(5)).to(device)
    for precision in plan.seg_precisions:
        row = {"precision": precision}
        try:
            r.need(plan.cell_estimate_s, f"a multi-scale {precision} evaluation")
            with precision_mode(precision) as amp:
                def model_fn(x):
                    with autocast(device, amp):
                        return model(x)
                multiscale_inference(model_fn, image, plan.seg_classes, scales=(1.0,), flip=False, base_scale=base,
                                     crop=crop, stride=stride)  # warm-up: one scale
                sync(device)
                t0 = time.perf_counter()
                probs = multiscale_inference(model_fn, image, plan.seg_classes, scales=MS_RATIOS, flip=True,
                                             base_scale=base, crop=crop, stride=stride)
                sync(device)
                sec = time.perf_counter() - t0
            if tuple(probs.shape) != (1, plan.seg_classes, h, w) or not torch.isfinite(probs).all():
                raise AssertionError(f"multi-scale output {tuple(probs.shape)} is not "
                                     f"(1, {plan.seg_classes}, {h}, {w}) or not finite")
            row.update(status="ok", seconds=sec, windows_per_s=2 * windows / sec)
        except Skip as e:
            row.update(status="skipped", reason=str(e))
        except Exception as e:  # noqa: BLE001
            row.update(status="failed", error=f"{type(e).__name__}: {str(e)[:500]}", oom=is_oom(e))
        r.log(f"  seg multi-scale eval {precision}: "
              + (f"{row['seconds']:.2f} s" if row["status"] == "ok" else row["status"]))
        evals.append(row)
    ev["runs"] = evals
    out["eval"] = ev
    if not any(x.get("status") == "ok" for x in train_rows + evals):
        raise RuntimeError("no segmentation measurement ran")
    return out


# -- the largest batch ------------------------------------------------------------------------------
def search_largest(probe: Callable[[int], Tuple[bool, Optional[int]]], start: int, cap: int,
                   capacity: Optional[float], max_probes: int, deadline: float, tol: float = 1 / 32) -> Dict:
    """The largest batch for which ``probe(batch)`` -> (fits, peak bytes) says it fits, in few probes.

    Two small batches give a line ``peak = a + b * batch``; the batch that line puts at ``capacity``
    (about 97% of it) is tried next, then doubling until a batch fails (or ``cap``), then bisection
    until the bracket is within ``tol`` of the batch. Stops after ``max_probes`` probes or at
    ``deadline`` (perf_counter); the result says why and keeps the bracket (largest fit, smallest fail).
    """
    probes: List[Dict] = []
    lo, hi = 0, None
    fit: Dict[int, int] = {}
    stop = "converged"

    def run(batch: int) -> bool:
        nonlocal lo, hi
        t0 = time.perf_counter()
        ok, peak = probe(batch)
        probes.append({"batch": batch, "fits": ok, "peak_bytes": peak, "seconds": round(time.perf_counter() - t0, 3)})
        if ok:
            lo = max(lo, batch)
            if peak is not None:
                fit[batch] = peak
        else:
            hi = batch if hi is None else min(hi, batch)
        return ok

    def out_of_time() -> bool:
        return len(probes) >= max_probes or time.perf_counter() > deadline

    b = max(1, min(start, cap))
    while not run(b) and b > 1 and not out_of_time():  # even the start fails: halve
        b //= 2
    predicted = None
    if lo and not out_of_time() and hi is None and 2 * lo <= cap:
        run(2 * lo)
        if len(fit) >= 2 and capacity:
            (b1, p1), (b2, p2) = sorted(fit.items())[:2]
            slope = (p2 - p1) / (b2 - b1)
            if slope > 0:
                predicted = int((capacity - (p1 - slope * b1)) / slope)
                guess = min(cap, int(predicted * 0.97))
                if guess > lo and (hi is None or guess < hi) and not out_of_time():
                    run(guess)
    tried_upper = False
    while lo and hi is None and lo < cap:  # grow: just past the prediction first, then doubling
        if out_of_time():
            stop = "probe or time limit"
            break
        if predicted and not tried_upper and math.ceil(predicted * 1.03) > lo:
            nxt, tried_upper = min(cap, max(lo + 1, math.ceil(predicted * 1.03))), True
        else:
            nxt = min(cap, 2 * lo)
        run(nxt)
    while hi is not None and hi - lo > max(1, int(lo * tol)):  # bisect
        if out_of_time():
            stop = "probe or time limit"
            break
        run((lo + hi) // 2)
    if hi is None and lo >= cap:
        stop = f"cap {cap} fits (the search stops there)"
    per_image = None
    if len(fit) >= 2:
        (b1, p1), (b2, p2) = sorted(fit.items())[-2:]
        per_image = (p2 - p1) / (b2 - b1)
    return {"largest_fit": lo, "smallest_fail": hi, "capped": hi is None and lo >= cap, "cap": cap, "stop": stop,
            "predicted": predicted, "per_image_bytes": per_image, "probes": probes}


def max_batch_section(key: str, precisions: Sequence[str] = ("bf16", "fp32")):
    def run(r: Runner) -> Dict:
        from benchmarks import memory
        device, plan = r.device, r.plan
        models = Models(r)
        label, kw = METHODS[0]
        model = models.get(key, kw)
        searches = []
        resident = memory.resident_bytes(model)
        for precision in precisions:
            for ckpt in (False, True):
                row = {"backbone": key, "model": vit_name(model), "method": label, "precision": precision,
                       "grad_checkpointing": ckpt}
                try:
                    r.need(min(plan.maxbatch_search_s, 10.0), "a batch search")
                    model.grad_checkpointing = ckpt
                    with precision_mode(precision) as amp:
                        def probe(batch: int) -> Tuple[bool, Optional[int]]:
                            try:
                                peak = memory.step_peak_bytes(model, batch, device, amp)
                            except Exception as e:  # noqa: BLE001
                                if not is_oom(e):
                                    raise
                                peak = None
                            for p in model.parameters():
                                p.grad = None
                            free_memory(device)
                            if peak is None:
                                return False, None
                            if device.type == "cpu":  # simulated device memory
                                return resident + peak <= plan.cpu_capacity_bytes, peak
                            return True, peak
                        if device.type == "cuda":
                            memory.step_peak_bytes(model, 2, device, amp)  # cuBLAS workspaces etc. first
                            free_memory(device)
                            free, _ = torch.cuda.mem_get_info(device)
                            capacity = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
                        else:
                            capacity = plan.cpu_capacity_bytes - resident
                        deadline = time.perf_counter() + min(plan.maxbatch_search_s, max(r.left() - 5.0, 1.0))
                        row.update(search_largest(probe, plan.maxbatch_start, plan.maxbatch_cap[key], capacity,
                                                  plan.maxbatch_probes, deadline))
                    row.update(status="ok", capacity_bytes=capacity,
                               how="CUDA: a training step (memory.step_peak_bytes), OOM caught"
                               if device.type == "cuda" else
                               f"CPU: live tensor bytes of a step + the model against a simulated "
                               f"{plan.cpu_capacity_bytes / 1e6:.1f} MB device")
                except Skip as e:
                    row.update(status="skipped", reason=str(e))
                except Exception as e:  # noqa: BLE001
                    row.update(status="failed", error=f"{type(e).__name__}: {str(e)[:500]}",
                               traceback=traceback.format_exc()[-2000:])
                finally:
                    model.grad_checkpointing = False
                    free_memory(device)
                r.log(f"  max batch {key} {precision} checkpointing={ckpt}: " + (
                    f"{row['largest_fit']}{'+' if row['capped'] else ''} (fails at {row['smallest_fail']}), "
                    f"{len(row['probes'])} probes" if row["status"] == "ok" else row["status"]))
                searches.append(row)
                r.doc["sections"][f"max_batch{'' if key == 'vitb16' else '_' + key}"]["searches"] = searches
                r.write()
        if not any(s["status"] == "ok" for s in searches):
            raise RuntimeError("no batch search ran")
        return {"searches": searches, "grad_checkpointing": "gapt PromptedViT.grad_checkpointing "
                "(torch.utils.checkpoint around each frozen block in training)", "resident_bytes": resident}
    return run


# -- Markdown -------------------------------------------------------------------------------------
def _f(x, fmt="{:.1f}", none="-"):
    return none if x is None else fmt.format(x)


def _gb(x):
    return "-" if x is None else f"{x / 2**30:.2f}"


def markdown(doc: Dict) -> str:
    s = doc["sections"]
    env = doc.get("environment_summary") or {}
    peak = env.get("peak_flops")
    lines = ["# GPU figures (benchmarks/gpu.py)", ""]
    if env:
        peak_txt = (f"{peak['entry']}: bf16 {peak['bf16'] / 1e12:.0f}, tf32 {peak['tf32'] / 1e12:.0f}, fp32 "
                    f"{peak['fp32'] / 1e12:.1f} dense TFLOP/s" if isinstance(peak, dict) else "unknown (MFU omitted)")
        lines += [f"Device: {env.get('device_name')}; peak for MFU: {peak_txt}. torch {env.get('torch')} "
                  f"(CUDA {env.get('torch_cuda')}), timm {env.get('timm')}, gapt {env.get('gapt')}, "
                  f"{env.get('date_utc')}.", ""]
    lines += [f"{'Smoke run (CPU, tiny ViTs): code paths only, not figures. ' if doc.get('smoke') else ''}"
              f"Budget {doc['budget']['budget_s']:.0f} s, elapsed {doc['budget']['elapsed_s']:.0f} s.", "",
              "## Sections", "", "| section | status | seconds | note |", "|---|---|---:|---|"]
    for key in SECTIONS:
        rec = s.get(key, {})
        note = rec.get("reason") or rec.get("error") or ""
        lines.append(f"| {key} | {rec.get('status')} | {_f(rec.get('seconds'))} | "
                     f"{str(note)[:300].replace('|', '/')} |")

    flops = s.get("flops", {})
    if flops.get("per_image"):
        lines += ["", "## flops (per image; formula in vit_flops)", "",
                  "| backbone | method | tokens N | forward GFLOP | backward GFLOP | step GFLOP |",
                  "|---|---|---:|---:|---:|---:|"]
        for row in flops["per_image"]:
            lines.append(f"| {row['model']} | {row['method']} | {row['tokens']} | {row['forward'] / 1e9:.4g} | "
                         f"{row['backward'] / 1e9:.4g} | {row['step'] / 1e9:.4g} |")

    cells = []
    for key in ("train_step", "train_step_vitl16", "train_step_compile"):
        cells += [(key, c) for c in s.get(key, {}).get("cells", [])]
    if cells:
        lines += ["", "## train_step, train_step_vitl16, train_step_compile (forward + backward + SGD step)", "",
                  "| section | model | method | batch | precision | ms/step | img/s | TFLOP/s | MFU | peak mem GiB "
                  "| note |",
                  "|---|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
        for key, c in cells:
            note = ""
            if c.get("status") != "ok":
                note = f"{c.get('status')}: {c.get('reason') or c.get('error')}"
            elif c.get("compile_s") is not None:
                note = (f"compile {c['compile_s']:.0f} s ({c.get('compile_backend')}), "
                        f"graph breaks {c.get('graph_breaks')}")
            lines.append(f"| {key} | {c.get('model', c['backbone'])} | {c['method']} | "
                         f"{c['batch']} ({c['batch_of']}) | "
                         f"{c['precision']} | {_f(c.get('step_ms'))} | {_f(c.get('images_per_s'), '{:.0f}')} | "
                         f"{_f(c.get('tflops_per_s'), '{:.2f}')} | {_f(c.get('mfu') and 100 * c['mfu'], '{:.1f}%')} | "
                         f"{_gb(c.get('peak_mem_bytes'))} | {str(note)[:200].replace('|', '/')} |")

    ev = []
    for key in ("eval_throughput", "eval_throughput_vitl16"):
        ev += [(key, c) for c in s.get(key, {}).get("cells", [])]
    if ev:
        lines += ["", "## eval_throughput, eval_throughput_vitl16 (inference mode, no grad)", "",
                  "| section | model | method | batch | precision | img/s | ms/batch | MFU |",
                  "|---|---|---|---:|---|---:|---:|---:|"]
        for key, c in ev:
            lines.append(f"| {key} | {c.get('model')} | {c['method']} | {c['batch']} | {c['precision']} | "
                         f"{_f(c.get('images_per_s'), '{:.0f}')} | {_f(c.get('ms_per_batch'))} | "
                         f"{_f(c.get('mfu') and 100 * c['mfu'], '{:.1f}%')} |")

    searches = []
    for key in ("max_batch", "max_batch_vitl16"):
        searches += [(key, x) for x in s.get(key, {}).get("searches", [])]
    if searches:
        lines += ["", "## max_batch, max_batch_vitl16 (largest training batch that fits; gated + temperature)", "",
                  "| section | model | precision | grad checkpointing | largest fit | smallest fail | MiB/image "
                  "| probes | stop |",
                  "|---|---|---|---|---:|---:|---:|---:|---|"]
        for key, x in searches:
            if x.get("status") != "ok":
                lines.append(f"| {key} | {x.get('model')} | {x['precision']} | {x['grad_checkpointing']} "
                             "| - | - | - | - | "
                             f"{x.get('status')}: {str(x.get('reason') or x.get('error'))[:150]} |")
                continue
            lines.append(f"| {key} | {x['model']} | {x['precision']} | {x['grad_checkpointing']} | "
                         f"{x['largest_fit']}{'+' if x['capped'] else ''} | {_f(x['smallest_fail'], '{}')} | "
                         f"{_f(x['per_image_bytes'] and x['per_image_bytes'] / 2**20, '{:.1f}')} | "
                         f"{len(x['probes'])} | {x['stop']} |")

    b = s.get("bf16_vs_fp32", {})
    if b.get("loss_fp32"):
        lg = b["logits"]
        lines += ["", f"## bf16_vs_fp32 ({b['model']}, {b['method']}, {b['steps']} steps, batch {b['batch']}, "
                      f"{b['images']} random images / {b['classes']} classes, same seed and data)", "",
                  f"- loss, step 1 -> mean of the last {b['last_steps']}: fp32 {b['loss_first']['fp32']:.4f} -> "
                  f"{b['loss_final']['fp32']:.4f}; bf16 {b['loss_first']['bf16']:.4f} -> {b['loss_final']['bf16']:.4f}",
                  f"- largest |loss difference| over the run {b['loss_max_abs_diff']:.4g} "
                  f"(relative {b['loss_max_rel_diff']:.3g}); mean over the last {b['last_steps']} steps "
                  f"{b['loss_mean_abs_diff_last']:.4g}",
                  f"- one forward (eval mode, batch {lg['batch']}): max |logit bf16 - fp32| {lg['max_abs_diff']:.4g} "
                  f"(mean {lg['mean_abs_diff']:.3g}; max |logit| {lg['max_abs_fp32']:.3g}, relative "
                  f"{lg['relative_max_diff']:.3g}); same argmax for {100 * lg['argmax_agreement']:.1f}% of the images"]
        n = len(b["loss_fp32"])
        steps = sorted({0, n - 1, *range(max(1, n // 10) - 1, n, max(1, n // 10))})
        lines += ["", "| step | " + " | ".join(str(i + 1) for i in steps) + " |",
                  "|---|" + "---:|" * len(steps),
                  "| loss fp32 | " + " | ".join(f"{b['loss_fp32'][i]:.4f}" for i in steps) + " |",
                  "| loss bf16 | " + " | ".join(f"{b['loss_bf16'][i]:.4f}" for i in steps) + " |"]

    for key in ("frozen_cache", "linear_probe_cache"):
        x = s.get(key, {})
        if x.get("ratio") is not None:
            if key == "frozen_cache":
                lines += ["", "## frozen_cache", "",
                          f"{x['ratio']:.2f}x: train epochs from the cached block-{x['insert_at_block'] - 1} "
                          "outputs vs "
                          f"all {x['depth']} blocks, vpt-at-block k={x['insert_at_block']}, {x['model']}, "
                          f"{x['prompts']} prompts, {x['images']} images, batch {x['batch']}, {x['precision']}: "
                          f"{x['epoch_s_all_blocks']:.3f} s -> {x['epoch_s_cached']:.3f} s per epoch, {x['spread']}; "
                          f"ideal {x['ideal']:.2f}x; val epochs {x['val_ratio']:.2f}x; "
                          f"cache build {x['build_s']:.3f} s"]
            else:
                lines += ["", "## linear_probe_cache", "", x["line"]]

    g = s.get("segmentation", {})
    if g.get("train") or g.get("eval"):
        lines += ["", f"## segmentation ({g.get('model')}, {g.get('classes')} classes)", "",
                  "| what | precision | batch | seconds | img/s | peak mem GiB | note |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for row in g.get("train", []):
            note = row.get("reason") or row.get("error") or (
                f"OOM at batch {row['oom_at']}" if row.get("oom_at") else "")
            lines.append(f"| train iteration {g['crop']}x{g['crop']} | {row['precision']} | "
                         f"{_f(row.get('batch'), '{}')} | "
                         f"{_f(row.get('iteration_s'), '{:.3f}')} | {_f(row.get('images_per_s'))} | "
                         f"{_gb(row.get('peak_mem_bytes'))} | {str(note)[:200]} |")
        e = g.get("eval") or {}
        for row in e.get("runs", []):
            lines.append(f"| multi-scale + flip eval {e['image'][0]}x{e['image'][1]} ({e['forward_passes']} windows) | "
                         f"{row['precision']} | 1 | {_f(row.get('seconds'), '{:.2f}')} | - | - | "
                         f"{str(row.get('reason') or row.get('error') or '')[:200]} |")

    d = s.get("ddp", {})
    lines += ["", "## ddp", "", f"{d.get('status')}: {d.get('reason') or d.get('error') or ''}", ""]
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------
def output_dir(arg: Optional[str]) -> Path:
    """``$OUT`` when set (the device machine's result folder), else ``--out``."""
    return Path(os.environ.get("OUT") or arg or "runs/gpu")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny ViTs, few steps: the code paths in under a minute")
    p.add_argument("--out", default=None,
                   help="folder for gpu.json and gpu.md (ignored when $OUT is set; default runs/gpu)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="time budget in seconds; once spent, later sections are skipped (default 420; smoke 240)")
    p.add_argument("--device", default=None, help="default: cuda if available (smoke: cpu)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=None, help="run only these sections")
    p.add_argument("--skip", nargs="+", choices=SECTIONS, default=(), help="skip these sections")
    p.add_argument("--compile-cells", type=int, default=None, help="compile at most this many cells (smoke: 1)")
    p.add_argument("--compile-start", type=int, default=0,
                   help="skip the first N compile cells of the order (those an earlier run measured)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; smoke aot_eager)")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (CPU default 1)")
    args = p.parse_args(argv)

    plan = smoke_plan() if args.smoke else full_plan()
    if args.compile_cells is not None:
        plan.compile_cells = args.compile_cells
    plan.compile_start = args.compile_start
    if args.compile_backend:
        plan.compile_backend = args.compile_backend
    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    budget = args.budget_s if args.budget_s is not None else (240.0 if args.smoke else 420.0)
    # environment always runs: it names the device and its peak FLOP/s, which every MFU needs
    selected = ["environment"] + [k for k in (args.only or SECTIONS) if k not in set(args.skip)]
    out = output_dir(args.out)
    r = Runner(plan, device, out, budget, selected, list(sys.argv[1:] if argv is None else argv), t0=T0)
    r.log(f"device {device}, budget {budget:.0f} s, writing {out / JSON_NAME} and {out / MD_NAME}")
    r.write()
    for module in ("gapt.engine.trainer", "gapt.seg.model", "gapt.seg.inference", "benchmarks.train_step",
                   "benchmarks.memory", "benchmarks.linear_probe_cache"):  # imported before gc.freeze
        importlib.import_module(module)
    gc.collect()
    gc.freeze()
    with quiet():
        r.section("environment", environment)
        r.section("flops", flops_section)
        r.section("ddp", ddp_section)
        r.section("train_step", train_step_section("vitb16"), min_s=plan.cell_estimate_s)
        r.section("eval_throughput", eval_section("vitb16"), min_s=plan.cell_estimate_s)
        r.section("bf16_vs_fp32", bf16_vs_fp32, min_s=4 * plan.cell_estimate_s)
        r.section("frozen_cache", frozen_cache_section, min_s=2 * plan.cell_estimate_s)
        r.section("linear_probe_cache", linear_probe_cache_section, min_s=2 * plan.cell_estimate_s)
        r.section("segmentation", segmentation, min_s=3 * plan.cell_estimate_s)
        r.section("max_batch", max_batch_section("vitb16"), min_s=3 * plan.cell_estimate_s)
        r.section("train_step_vitl16", train_step_section("vitl16"), min_s=3 * plan.cell_estimate_s)
        r.section("eval_throughput_vitl16", eval_section("vitl16"), min_s=plan.cell_estimate_s)
        r.section("max_batch_vitl16", max_batch_section("vitl16", ("bf16",)), min_s=3 * plan.cell_estimate_s)
        r.section("train_step_compile", compile_section, min_s=plan.first_compile_estimate_s["vitb16"])
    r.write()
    statuses = {k: v.get("status") for k, v in r.doc["sections"].items()}
    r.log("done: " + ", ".join(f"{k} {v}" for k, v in statuses.items()))
    r.log(f"wrote {out / JSON_NAME} and {out / MD_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
