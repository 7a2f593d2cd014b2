"""gapt: Gated Prompt Tuning and Adaptive Attention Shaping for frozen self-supervised ViTs."""
__version__ = "0.1.0"

from .model import (BACKBONES, CheckpointError, PromptedViT, build_model, load_model,  # noqa: E402
                    register_backbone, selection_ratio)

__all__ = ["__version__", "build_model", "load_model", "selection_ratio", "PromptedViT", "register_backbone",
           "BACKBONES", "CheckpointError"]
