"""One run's life, written once for the two loops on top of it: classification trains by epochs
(:mod:`gapt.engine.trainer`), segmentation by iterations (:mod:`gapt.seg.train`), the way
MMSegmentation keeps an epoch runner and an iteration runner over one base.

:class:`Run` opens and validates the run folder, keeps the resume state (the loop's tensors and
counters plus the RNG), wraps the model (SyncBatchNorm where asked, DDP, compile), stops every
process at the same step when a loss is not finite, writes metrics lines and the resume file
atomically, and builds the results every run records.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .. import config as C
from ..method import MethodSettings
from . import distributed as dist
from . import runfolder as rf
from . import tracking
from .precision import autocast_dtype_for, precision_record, precision_scope

log = logging.getLogger("gapt")


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last resume state, if any, stays in the run folder."""


# -- process set-up ---------------------------------------------------------------------------
def resolve_device(cfg: C.RunConfig) -> torch.device:
    """``auto`` and ``cuda`` mean this process's GPU: cuda:LOCAL_RANK under torchrun, else cuda:0.

    The GPU is also made current, so NCCL and any kernel launched without a device land on it
    (with several processes on one machine, an unset current device puts every rank on GPU 0).
    """
    kind = cfg.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind.startswith("cuda") and not torch.cuda.is_available():
        raise C.ConfigError(f"bad value for config key 'device': {cfg.device!r} but no CUDA device is available")
    device = torch.device("cuda", dist.local_rank()) if kind == "cuda" else torch.device(kind)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def autocast_dtype(cfg: C.RunConfig, device: torch.device) -> Optional[torch.dtype]:
    return autocast_dtype_for(cfg.train.precision, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(model=None) -> Dict:
    """The global RNG streams and, with a PromptedViT using hard gates, its Gumbel-noise stream."""
    out = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
           "python_pos": random.getstate()[2],
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if model is not None and model.gate_noise is not None:  # hard gates' Gumbel stream
        out["gate_noise"] = model.gate_noise.get_state()
    return out


def set_rng_state(s: Dict, model=None) -> None:
    if model is not None and model.gate_noise is not None and "gate_noise" in s:
        model.gate_noise.set_state(s["gate_noise"])
    torch.set_rng_state(s["torch"])
    random.setstate((3, tuple(s["python"]), s["python_pos"]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def check_model_config(cfg: C.RunConfig, size_key: str = "image_size") -> None:
    """Backbone name, weights file, image size vs patch size, insertion block: before any data or file."""
    from ..model.preflight import check_model_settings
    check_model_settings(cfg.backbone, cfg.weights, C.get_key(cfg, size_key), cfg.method, cfg.insert_at_block,
                         size_key)


def config_for_resume(run_dir: str) -> C.RunConfig:
    path = Path(run_dir) / rf.CONFIG
    if not Path(run_dir).is_dir():
        raise rf.RunFolderError(f"run folder {run_dir} does not exist; nothing to resume")
    if not (Path(run_dir) / rf.RESUME).exists():
        raise rf.RunFolderError(f"{run_dir} has no resume file ({rf.RESUME}); nothing to resume")
    cfg = C.load_config(str(path), saved=True)
    return replace(cfg, out=str(run_dir))


def in_process_group(cfg: C.RunConfig, body: Callable[[torch.device], Dict]) -> Dict:
    """``body(device)`` inside this process's torchrun group (created and destroyed here if needed),
    at the run's precision (fp32: TF32 off while it lasts)."""
    device = resolve_device(cfg)
    with dist.process_group(device.type), precision_scope(cfg.train.precision, device):
        return body(device)


def check_finite(values: Sequence[float], places: Sequence[str], device, resume_path: Optional[Path],
                 saved: str, nothing_saved: str) -> None:
    """Raise TrainingDiverged at the first non-finite loss of any process, in every process alike.

    ``places`` name each value's step ("epoch 0 step 3"); ``saved`` (``{path}``: the resume file)
    or ``nothing_saved`` says what the run folder keeps, chosen by whether that file exists.
    """
    bad = [0.0 if math.isfinite(v) else 1.0 for v in values]
    if dist.world_size() > 1:  # every process stops at the same step, none waits in a collective
        bad = dist.all_sum(bad, device)
    for value, bad_here, place in zip(values, bad, places):
        if bad_here:
            what = f"loss is {value}" if not math.isfinite(value) else "the loss is not finite in another process"
            kept = saved.format(path=resume_path) if resume_path is not None and resume_path.exists() else nothing_saved
            raise TrainingDiverged(f"{what} at {place}; stopped. {kept}; a lower train.lr may help")


# -- the run ----------------------------------------------------------------------------------
class Run:
    """The run folder of ``cfg.out`` and what every loop does the same way around its steps.

    Opening it checks the global batch against the processes, refuses a fresh start in a folder
    that holds a run, clears the metrics of a fresh start and (re)writes config.yaml.
    ``command`` is the command line that continues the run, for messages.
    """

    def __init__(self, cfg: C.RunConfig, device: torch.device, resume: bool = False, command: str = "gapt train"):
        self.cfg, self.device, self.resume, self.command = cfg, device, resume, command
        self.out = Path(cfg.out)
        self.dtype = autocast_dtype(cfg, device)
        self.world = dist.world_size()
        batch = cfg.train.batch_size
        if batch % self.world:
            raise C.ConfigError(f"bad value for config key 'train.batch_size': {batch} does not divide over "
                                f"{self.world} processes")
        tracking.resolve_logger(cfg.train.logger)  # a missing package fails before any work
        self.tracker: Optional[tracking.Tracker] = None
        if dist.is_main():
            if not resume:
                rf.check_new_run(self.out, command)
            self.out.mkdir(parents=True, exist_ok=True)
            if not resume:  # lines left by a fresh start killed before its first resume file
                rf.atomic_write_text(self.out / rf.METRICS, "")
            rf.atomic_write_text(self.out / rf.CONFIG, C.to_yaml(cfg))

    @property
    def per_process_batch(self) -> int:
        return self.cfg.train.batch_size // self.world

    @property
    def resume_path(self) -> Path:
        return self.out / rf.RESUME

    # -- wrapping -------------------------------------------------------------------------
    def sync_batchnorm(self, model: nn.Module) -> nn.Module:
        """BatchNorm statistics over every process (CUDA only; warned and kept per process on CPU)."""
        if self.world > 1 and self.device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if self.world > 1:
            log.warning("SyncBatchNorm needs CUDA; the heads' BatchNorm statistics stay per process on %s",
                        self.device)
        return model

    def wrap(self, module: nn.Module) -> Callable:
        """The training forward: ``module`` itself, under DDP when there are several processes, compiled
        if train.compile asks."""
        forward = module
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            forward = DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda"
                                              else None)
        if self.cfg.train.compile:
            forward = torch.compile(forward)
            log.info("train.compile: the first training steps compile the model; the first timings include it")
        return forward

    # -- resume state -----------------------------------------------------------------------
    def save_state(self, state: Dict, model=None) -> None:
        """The loop's state plus the RNG (and ``model``'s hard-gate noise stream), atomically (main process)."""
        if dist.is_main():
            rf.atomic_torch_save({**state, "rng": rng_state(model)}, self.resume_path)

    def load_state(self, model=None) -> Dict:
        """The resume file's content; the RNG (and ``model``'s gate noise) is restored from it: call once
        the model and optimizer exist."""
        state = torch.load(self.resume_path, map_location="cpu", weights_only=True)
        set_rng_state(state["rng"], model)
        return state

    def check_finite(self, values: Sequence[float], places: Sequence[str], saved: str, nothing_saved: str) -> None:
        check_finite(values, places, self.device, self.resume_path, saved, nothing_saved)

    # -- records ----------------------------------------------------------------------------
    def open_tracker(self, start_step: int) -> None:
        """Curves (train.logger) from ``start_step`` on: continued, not repeated, on resume (main process)."""
        cfg = self.cfg
        self.tracker = tracking.open_tracker(cfg.train.logger, self.out, start_step=start_step, resume=self.resume,
                                             config=C.to_dict(cfg), config_text=C.to_yaml(cfg), enabled=dist.is_main())

    def append_metrics(self, record: Dict, step: Optional[int] = None, model=None) -> None:
        """A metrics.jsonl line and, with a tracker, the same values as curve points at ``step``
        (``model``: the prompted encoder, whose gates and temperatures are plotted too)."""
        if dist.is_main():
            rf.append_metrics(self.out, record)
            if self.tracker is not None:
                self.tracker.log_record(record, step, model)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None

    def keep_metrics(self, keep: Callable[[Dict], bool]) -> None:
        """On resume: drop the lines the resume state does not cover (written just before a kill)."""
        if dist.is_main():
            rf.keep_metrics(self.out, keep)

    def base_results(self, model, task: str, final: bool, metrics: Dict, data: Dict, tuned_params: int,
                     train_time: float) -> Dict:
        """results.json's keys every run has; ``model`` is the prompted encoder (its method settings)."""
        cfg = self.cfg
        settings = MethodSettings.of(model.settings, prompt_init=cfg.prompt_init).as_dict()
        return {"backbone": cfg.backbone, **settings, "benchmark": cfg.data.format, "task": task,
                "seed": cfg.train.seed, "final": final, "metrics": metrics, "data": data,
                "tuned_params": tuned_params, "train_time_s": train_time, "device": str(self.device),
                **precision_record(cfg.train.precision, self.device),
                "pos_embed_interpolation": model.pos_embed_interpolation, "world_size": self.world,
                "batch_size": cfg.train.batch_size, "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay}

    def finish(self, results: Dict, write_files: Callable[[], None], step: int) -> Dict:
        """The main process writes the tuned file and the like (``write_files``), then results.json
        last, which marks the run finished (and the final metrics at ``step`` to the tracker);
        every process waits for it."""
        if dist.is_main():
            write_files()
            rf.write_json(self.out / rf.RESULTS, results)
            if self.tracker is not None:
                self.tracker.log_results(results["metrics"], step)
        self.close()
        dist.barrier()
        return results
