"""The model layer: backbones (timm ViT + checkpoint adapters), the method as parts (parts/), tuned files,
merging into plain timm ViTs and HF peft adapters."""
from .backbones import BACKBONES, BackboneSpec, register_backbone
from .build import build_backbone, build_model, load_model
from .checkpoints import CheckpointError
from .merge import load_merged, merge, save_merged, timm_classifier
from .parts import NotMergeable
from .prompted import METHODS, PROMPT_METHODS, PromptedViT
from .selection import selection_ratio

__all__ = ["BACKBONES", "BackboneSpec", "register_backbone", "build_backbone", "build_model", "load_model",
           "CheckpointError", "METHODS", "PROMPT_METHODS", "PromptedViT", "selection_ratio", "merge", "save_merged",
           "load_merged", "timm_classifier", "NotMergeable"]
