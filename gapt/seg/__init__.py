"""Semantic segmentation on a prompted ViT: data, SETR-PUP heads, metrics, inference, colour maps."""
from .data import (SegDataError, SegDataset, build_ade20k, build_folder_seg, build_seg_datasets,
                   read_class_names)
from .head import SETRPUPHead, SegmentationModel, seg_loss, tokens_to_map
from .inference import (MS_RATIOS, inference, multiscale_inference, pyramid_inference, slide_inference,
                        slide_windows, whole_inference)
from .metrics import SegMetrics, confusion_matrix, reduce_confusion
from .palette import ADE20K_CLASSES, PALETTE, colorize, save_mask_png, save_overlay_png
from .transforms import (IGNORE_INDEX, PhotoMetricDistortion, SegEvalPipeline, SegMultiScalePipeline,
                         SegTrainPipeline)

__all__ = [
    "ADE20K_CLASSES", "IGNORE_INDEX", "MS_RATIOS", "PALETTE", "PhotoMetricDistortion", "SETRPUPHead",
    "SegDataError", "SegDataset", "SegEvalPipeline", "SegMetrics", "SegMultiScalePipeline", "SegTrainPipeline",
    "SegmentationModel",
    "build_ade20k", "build_folder_seg", "build_seg_datasets", "colorize", "confusion_matrix", "inference",
    "multiscale_inference", "pyramid_inference", "read_class_names", "reduce_confusion", "save_mask_png",
    "save_overlay_png",
    "seg_loss", "slide_inference", "slide_windows", "tokens_to_map", "whole_inference",
]
