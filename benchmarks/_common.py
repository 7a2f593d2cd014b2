"""Shared pieces of the benchmarks: results, clocks, paired timing, command-line options.

Every benchmark measures a *ratio* of a baseline against gapt in one process: the two are
run alternately (baseline, candidate, candidate, baseline, ...) and the reported figure is
the median of the per-pair ratios, so load from other processes that lasts longer than one
pair cancels out.

On CPU the default clock is the process's CPU time with one intra-op thread: on a shared,
loaded machine wall time mostly measures the other processes, while the CPU time of a
single-threaded run is the work done (``--threads N --clock wall`` measures wall time
instead). On CUDA the clock is wall time around ``torch.cuda.synchronize()``.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional

import torch


@dataclass
class Result:
    """One printed line: ``NAME: X.XXx (detail)``; ``ratio=None`` prints ``NAME: skipped (detail)``
    (or ``NAME: failed (detail)`` with ``failed=True``)."""
    name: str
    ratio: Optional[float]
    detail: str
    target: Optional[float] = None
    extra: dict = field(default_factory=dict)
    failed: bool = False

    @property
    def met(self) -> Optional[bool]:
        if self.ratio is None or self.target is None:
            return None
        return self.ratio >= self.target

    def line(self) -> str:
        if self.ratio is None:
            return f"{self.name}: {'failed' if self.failed else 'skipped'} ({self.detail})"
        target = ""
        if self.target is not None:
            target = f"; target >= {self.target:.2f}x {'met' if self.met else 'NOT met'}"
        return f"{self.name}: {self.ratio:.2f}x ({self.detail}{target})"


class Clock:
    """``cpu``: process CPU time; ``wall``: perf_counter (synchronising CUDA around the call)."""

    def __init__(self, kind: str = "cpu", device: torch.device = torch.device("cpu")):
        if kind not in ("cpu", "wall"):
            raise ValueError(f"clock must be cpu or wall, got {kind!r}")
        if kind == "cpu" and device.type == "cuda":
            kind = "wall"  # CPU time says nothing about GPU work
        self.kind, self.device = kind, device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.process_time() if self.kind == "cpu" else time.perf_counter()

    def time(self, fn: Callable[[], object]) -> float:
        start = self.now()
        fn()
        return self.now() - start

    def describe(self) -> str:
        if self.device.type == "cuda":
            return f"{torch.cuda.get_device_name(self.device)}, wall time"
        threads = torch.get_num_threads()
        what = "CPU time" if self.kind == "cpu" else "wall time"
        return f"cpu {threads} thread{'s' if threads > 1 else ''}, {what}"


@dataclass
class Paired:
    """Medians of alternating baseline/candidate timings and of their per-pair ratios."""
    ratio: float          # median over pairs of baseline_time / candidate_time
    baseline_s: float     # median baseline time
    candidate_s: float    # median candidate time
    low: float            # smallest and largest per-pair ratio
    high: float
    pairs: int

    def spread(self) -> str:
        return f"median of {self.pairs} pair{'s' if self.pairs > 1 else ''} [{self.low:.2f}-{self.high:.2f}]"


def paired(baseline: Callable[[], object], candidate: Callable[[], object], repeats: int, clock: Clock,
           warmup: int = 1) -> Paired:
    """Time ``baseline`` and ``candidate`` ``repeats`` times each, interleaved, after ``warmup`` rounds."""
    for _ in range(warmup):
        baseline()
        candidate()
    base, cand = [], []
    for r in range(max(1, repeats)):
        if r % 2 == 0:  # alternate which goes first so neither always runs on a warm cache
            base.append(clock.time(baseline))
            cand.append(clock.time(candidate))
        else:
            cand.append(clock.time(candidate))
            base.append(clock.time(baseline))
    ratios = [b / max(c, 1e-12) for b, c in zip(base, cand)]
    return Paired(statistics.median(ratios), statistics.median(base), statistics.median(cand),
                  min(ratios), max(ratios), len(ratios))


def resolve_device(device: Optional[str] = None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def setup(threads: Optional[int], clock: Optional[str], device: torch.device) -> Clock:
    """Thread count and clock for a run: one thread + CPU time on CPU unless told otherwise."""
    if device.type == "cpu":
        torch.set_num_threads(threads or 1)
        kind = clock or ("cpu" if torch.get_num_threads() == 1 else "wall")
    else:
        if threads:
            torch.set_num_threads(threads)
        kind = "wall"
    return Clock(kind, device)


@contextlib.contextmanager
def quiet():
    """No warnings (random-weight backbones warn by design) and no gapt log lines."""
    loggers = [logging.getLogger(n) for n in ("gapt", "gapt.data")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def build(backbone: str, **kw):
    """``gapt.build_model`` with a random backbone, quietly and reproducibly."""
    from gapt import build_model
    torch.manual_seed(kw.pop("seed", 0))
    with quiet():
        return build_model(backbone, weights=None, **kw)


def vit_name(model) -> str:
    """``ViT-B/16 224px`` for the ViT-B/16 backbones, else the size spelled out."""
    vit = model.backbone
    heads = vit.blocks[0].attn.num_heads
    size = f"{model.image_size}px"
    if (vit.embed_dim, model.depth, heads, model.patch_size) == (768, 12, 12, 16):
        return f"ViT-B/16 {size}"
    return f"ViT depth {model.depth} width {vit.embed_dim} patch {model.patch_size} {size}"


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def arg_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="reduced sizes (the whole suite in under 3 minutes)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (CPU default: 1)")
    p.add_argument("--clock", choices=["cpu", "wall"], default=None,
                   help="CPU default: process CPU time with 1 thread, wall time otherwise")
    return p


def print_results(results: Iterable[Result]) -> List[Result]:
    out = []
    for r in results:
        print(r.line(), flush=True)
        out.append(r)
    return out


def main_for(module_run: Callable[..., List[Result]], description: str, add_args=None, argv=None) -> None:
    """The ``__main__`` of one benchmark script: common options, run, print its line(s)."""
    parser = arg_parser(description)
    if add_args:
        add_args(parser)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    clock = setup(args.threads, args.clock, device)
    extra = {k: v for k, v in vars(args).items() if k not in ("quick", "device", "threads", "clock")}
    print_results(module_run(quick=args.quick, device=device, clock=clock, **extra))
