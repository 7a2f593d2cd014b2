"""The engine: one training or evaluation run (loop, schedule, AMP, DDP, checkpoints, logging)."""
from .inference import eval_run, load_run, predict
from .trainer import TrainingDiverged, evaluate, train

__all__ = ["train", "evaluate", "eval_run", "load_run", "predict", "TrainingDiverged"]
