"""The engine: one training or evaluation run (loop, schedule, AMP, DDP, checkpoints, logging).

Names are imported on first use (see gapt/_lazy.py).
"""
from .._lazy import lazy_exports

__all__ = ["train", "evaluate", "eval_run", "load_run", "predict", "TrainingDiverged"]
__getattr__, __dir__ = lazy_exports(__name__, {"train": ".trainer", "evaluate": ".trainer",
                                               "TrainingDiverged": ".run", "eval_run": ".inference",
                                               "load_run": ".inference", "predict": ".inference"})
