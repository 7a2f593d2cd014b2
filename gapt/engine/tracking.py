"""Experiment tracking: the metrics a run writes to ``metrics.jsonl``, also for TensorBoard or W&B.

One small interface, ``Tracker`` (``log_record``, ``log_results``, ``close``), behind
``train.logger``:

  auto         TensorBoard when the ``tensorboard`` package is installed (``gapt[tb]``), else none
  tensorboard  event files under ``RUN/tb/`` (``tensorboard --logdir RUN/tb``)
  wandb        the W&B client (``gapt[wandb]``); files under ``RUN/wandb/``; ``WANDB_MODE=offline``
               works without network; the run id is kept in ``RUN/wandb_run_id`` so a resumed
               run continues the same W&B run
  none         nothing beyond metrics.jsonl

Tags: ``train/loss``, ``train/lr``, ``train/images_per_s`` (each logging interval),
``val/<metric>`` (each evaluation: ``val/top1``, ``val/loss``; segmentation ``val/mIoU`` ...),
``gates/block_<l>``, ``selection_ratio/block_<l>``, ``temperature/block_<l>`` (with each record,
when the method has them), ``results/<metric>`` (the final results), and the resolved config
(TensorBoard text ``config``; W&B run config).

Steps are a global counter the caller derives from its saved progress (optimizer steps for
classification, iterations for segmentation; any monotone counter for other jobs), so a resumed
run continues the same curves: TensorBoard drops everything a killed process wrote after the
resume point (``purge_step``); W&B (same run id) refuses steps below its current one, so such a
point keeps the value the killed process logged (online runs; offline, each process writes its own
run file, merged by ``wandb sync``).
Only the main process of a distributed run logs (``enabled``).
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Dict, Mapping, Optional

from ..config import ConfigError

log = logging.getLogger("gapt")

LOGGERS = ("auto", "tensorboard", "wandb", "none")
TB_DIR, WANDB_DIR, WANDB_ID = "tb", "wandb", "wandb_run_id"
COUNTERS = ("epoch", "iteration")          # the step axis, not curves
TRAIN_KEYS = ("loss", "lr", "images_per_s")


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def resolve_logger(kind: str) -> str:
    if kind not in LOGGERS:
        raise ConfigError(f"bad value for config key 'train.logger': {kind!r}; choose one of {list(LOGGERS)}")
    if kind == "auto":
        return "tensorboard" if tensorboard_available() else "none"
    if kind == "tensorboard" and not tensorboard_available():
        raise ConfigError("train.logger=tensorboard needs the tensorboard package: pip install 'gapt[tb]'")
    if kind == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.logger=wandb needs the wandb package: pip install 'gapt[wandb]'")
    return kind


def record_scalars(record: Mapping) -> Dict[str, float]:
    """A metrics.jsonl line -> {tag: value}: train keys under train/, val_/test_ keys under val/ and
    test/, any other number (segmentation's mIoU, mAcc, aAcc) under val/; counters and non-numbers skipped."""
    out = {}
    for k, v in record.items():
        if k in COUNTERS or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        if k in TRAIN_KEYS:
            out[f"train/{k}"] = float(v)
        elif k.startswith(("val_", "test_")):
            split, name = k.split("_", 1)
            out[f"{split}/{name}"] = float(v)
        else:
            out[f"val/{k}"] = float(v)
    return out


def method_scalars(model) -> Dict[str, float]:
    """Gates g_l, selection ratios r_l (blocks 1..L-1) and temperatures tau_l (1..L) of a PromptedViT."""
    out: Dict[str, float] = {}
    if model is None:
        return out
    if getattr(model, "gate_logits", None) is not None:
        from ..model.selection import selection_ratio
        sel = selection_ratio(model)
        for l, (g, r) in enumerate(zip(sel["gate"], sel["selection_ratio"]), start=1):
            out[f"gates/block_{l}"] = float(g)
            out[f"selection_ratio/block_{l}"] = float(r)
    if getattr(model, "temperature", None) is not None:
        from ..model.prompted import TEMPERATURE_RANGE
        for l, t in enumerate(model.temperature.detach().clamp(*TEMPERATURE_RANGE).cpu().tolist(), start=1):
            out[f"temperature/block_{l}"] = float(t)
    return out


class Tracker:
    """The interface (and the ``none`` logger): every method is a no-op."""

    kind = "none"

    def log(self, values: Dict[str, float], step: int) -> None:
        pass

    def log_record(self, record: Mapping, step: int, model=None) -> None:
        """One metrics.jsonl line (plus the model's gates/temperatures) at global ``step``."""
        values = {**record_scalars(record), **method_scalars(model)}
        if values:
            self.log(values, step)

    def log_results(self, metrics: Mapping, step: int) -> None:
        values = {f"results/{k}": float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if values:
            self.log(values, step)

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    kind = "tensorboard"

    def __init__(self, folder: Path, start_step: int, resume: bool, config_text: str):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: events a killed process wrote after the resume point are dropped by readers
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=start_step + 1 if resume else None)
        if config_text and not resume:
            self.writer.add_text("config", "```yaml\n" + config_text + "\n```", 0)
            self.writer.flush()

    def log(self, values, step):
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()  # a kill must not lose the curves of finished steps

    def close(self):
        self.writer.close()


class WandbTracker(Tracker):
    kind = "wandb"

    def __init__(self, folder: Path, resume: bool, config: Optional[dict], name: str):
        import wandb
        id_file = folder / WANDB_ID
        run_id = id_file.read_text().strip() if resume and id_file.exists() else None
        if run_id is None:
            import secrets
            run_id = secrets.token_hex(4)  # W&B run ids: lowercase letters and digits
            id_file.write_text(run_id + "\n")
        # wandb writes under dir/wandb/
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gapt"), name=name, id=run_id,
                              resume="allow", dir=str(folder), config=config or {})

    def log(self, values, step):
        self.run.log(dict(values), step=step)

    def log_results(self, metrics, step):
        super().log_results(metrics, step)
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.run.summary[f"results/{k}"] = v

    def close(self):
        self.run.finish()


def open_tracker(kind: str, folder, *, start_step: int = 0, resume: bool = False,
                 config: Optional[dict] = None, config_text: str = "", enabled: bool = True) -> Tracker:
    """The tracker for run folder ``folder``; ``start_step``: the global step the resume state covers.

    A fresh run (``resume=False``) first removes what an earlier, killed attempt left in the folder.
    """
    kind = resolve_logger(kind)
    if not enabled or kind == "none":
        return Tracker()
    folder = Path(folder)
    if not resume:
        shutil.rmtree(folder / TB_DIR, ignore_errors=True)
        (folder / WANDB_ID).unlink(missing_ok=True)
    if kind == "tensorboard":
        return TensorBoardTracker(folder / TB_DIR, start_step, resume, config_text)
    return WandbTracker(folder, resume, config, folder.name)
