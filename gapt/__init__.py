"""gapt: Gated Prompt Tuning and Adaptive Attention Shaping for frozen self-supervised ViTs."""
import os

from ._lazy import lazy_exports

__version__ = "0.1.0"

# Idle OpenMP threads sleep instead of spinning: on a shared or busy CPU, spinning torch
# threads made small-model training 5-10x slower here. Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The API is imported on first use (torch and timm load then, not at `import gapt`).
__all__ = ["__version__", "build_model", "load_model", "selection_ratio", "PromptedViT", "register_backbone",
           "BACKBONES", "CheckpointError", "merge", "save_merged", "load_merged"]
__getattr__, __dir__ = lazy_exports(__name__, {name: ".model" for name in __all__[1:]})
