"""Semantic segmentation on a prompted ViT: data, SETR-PUP heads, metrics, inference, colour maps.

Names are imported on first use (see gapt/_lazy.py), so `gapt seg --help` loads no torch.
"""
from .._lazy import lazy_exports

_EXPORTS = {
    ".data": ["SegDataError", "SegDataset", "build_ade20k", "build_folder_seg", "build_seg_datasets",
              "read_class_names"],
    ".head": ["SETRPUPHead", "SegmentationModel", "seg_loss", "tokens_to_map"],
    ".inference": ["MS_RATIOS", "inference", "multiscale_inference", "pyramid_inference", "slide_inference",
                   "slide_windows", "whole_inference"],
    ".metrics": ["SegMetrics", "confusion_matrix", "reduce_confusion"],
    ".palette": ["ADE20K_CLASSES", "PALETTE", "colorize", "save_mask_png", "save_overlay_png"],
    ".transforms": ["IGNORE_INDEX", "PhotoMetricDistortion", "SegEvalPipeline", "SegMultiScalePipeline",
                    "SegTrainPipeline"],
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, {n: mod for mod, names in _EXPORTS.items() for n in names})
