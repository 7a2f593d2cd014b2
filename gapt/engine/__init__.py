"""The engine: one training or evaluation run (loop, schedule, AMP, DDP, checkpoints, logging)."""
from .inference import eval_run, load_run, predict
from .run import TrainingDiverged
from .trainer import evaluate, train

__all__ = ["train", "evaluate", "eval_run", "load_run", "predict", "TrainingDiverged"]
