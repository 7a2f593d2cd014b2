"""The model layer: backbones (timm ViT + checkpoint adapters), the prompted method, tuned files."""
from .backbones import BACKBONES, BackboneSpec, register_backbone
from .build import build_backbone, build_model, load_model
from .checkpoints import CheckpointError
from .prompted import METHODS, PROMPT_METHODS, PromptedViT
from .selection import selection_ratio

__all__ = ["BACKBONES", "BackboneSpec", "register_backbone", "build_backbone", "build_model", "load_model",
           "CheckpointError", "METHODS", "PROMPT_METHODS", "PromptedViT", "selection_ratio"]
