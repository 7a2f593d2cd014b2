"""Confusion-matrix segmentation metrics (mIoU, mAcc, aAcc) as MMSegmentation's IoUMetric computes them.

Per class c, from the confusion matrix M (rows = label, columns = prediction, ignored pixels left
out): IoU_c = M_cc / (row_c + col_c - M_cc), Acc_c = M_cc / row_c. A class with an empty union
(absent from labels and predictions) has IoU NaN; a class absent from the labels has Acc NaN;
NaN classes are left out of the means. aAcc = trace / labelled pixels. All in percent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .transforms import IGNORE_INDEX


def confusion_matrix(pred, label, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(C, C) int64 counts, ``[label, prediction]``, over pixels whose label is not ``ignore_index``.

    ``pred`` and ``label`` are integer tensors (or arrays) of the same shape (any batch layout).
    """
    pred = torch.as_tensor(pred)
    label = torch.as_tensor(label, device=pred.device)
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}")
    pred, label = pred.reshape(-1).long(), label.reshape(-1).long()
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]
    if label.numel() and (label.min() < 0 or label.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1} or be {ignore_index}, "
                         f"got {int(label.min())}..{int(label.max())}")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predictions must lie in 0..{num_classes - 1}, got {int(pred.min())}..{int(pred.max())}")
    counts = torch.bincount(label * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).to(torch.int64)


def reduce_confusion(cm: torch.Tensor) -> torch.Tensor:
    """Sum a confusion matrix over torch.distributed processes when a process group is up; else as is."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return cm
    device = cm.device
    work = cm.to(torch.int64)
    if dist.get_backend() == "nccl" and work.device.type != "cuda":
        work = work.cuda()
    else:
        work = work.clone()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(device)


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


@dataclass
class SegMetrics:
    miou: float
    macc: float
    aacc: float
    iou: np.ndarray                     # per class, percent, NaN where undefined
    acc: np.ndarray
    class_names: Optional[List[str]] = field(default=None)

    @classmethod
    def from_confusion(cls, cm, class_names: Optional[Sequence[str]] = None) -> "SegMetrics":
        cm = cm.detach().cpu().numpy() if isinstance(cm, torch.Tensor) else np.asarray(cm)
        if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
            raise ValueError(f"a confusion matrix must be square, got shape {cm.shape}")
        if class_names is not None and len(class_names) != cm.shape[0]:
            raise ValueError(f"{len(class_names)} class names for a {cm.shape[0]}-class confusion matrix")
        cm = cm.astype(np.float64)
        inter = np.diag(cm)
        area_label = cm.sum(axis=1)
        area_pred = cm.sum(axis=0)
        union = area_label + area_pred - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, inter / union, np.nan) * 100.0
            acc = np.where(area_label > 0, inter / area_label, np.nan) * 100.0
        total = area_label.sum()
        aacc = float(inter.sum() / total * 100.0) if total > 0 else math.nan
        return cls(miou=_nanmean(iou), macc=_nanmean(acc), aacc=aacc, iou=iou, acc=acc,
                   class_names=list(class_names) if class_names is not None else None)

    def per_class(self) -> List[Dict[str, object]]:
        names = self.class_names or [str(i) for i in range(len(self.iou))]
        return [{"class": n, "iou": _json_float(i), "acc": _json_float(a)}
                for n, i, a in zip(names, self.iou, self.acc)]

    def as_dict(self, per_class: bool = False) -> Dict[str, object]:
        out: Dict[str, object] = {"mIoU": _json_float(self.miou), "mAcc": _json_float(self.macc),
                                  "aAcc": _json_float(self.aacc)}
        if per_class:
            out["per_class"] = self.per_class()
        return out


def _json_float(x) -> Optional[float]:
    x = float(x)
    return None if math.isnan(x) else x
