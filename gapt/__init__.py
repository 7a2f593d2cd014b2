"""gapt: Gated Prompt Tuning and Adaptive Attention Shaping for frozen self-supervised ViTs."""
import os

__version__ = "0.1.0"

# Idle OpenMP threads sleep instead of spinning: on a shared or busy CPU, spinning torch
# threads made small-model training 5-10x slower here. Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .model import (BACKBONES, CheckpointError, PromptedViT, build_model, load_model,  # noqa: E402
                    register_backbone, selection_ratio)

__all__ = ["__version__", "build_model", "load_model", "selection_ratio", "PromptedViT", "register_backbone",
           "BACKBONES", "CheckpointError"]
