"""Semantic segmentation metrics: one confusion matrix accumulated over label maps, and its mIoU / pixel accuracy.

GT labels outside ``[0, num_classes)`` and the ignore index are not counted; mIoU is the nanmean over classes of
TP / (TP + FP + FN), a class absent from both GT and prediction being NaN and left out; background (class 0)
counts as a class. Reports are in percent (``model.training.evaluation.percent``), None where undefined. Needs
numpy only: torch tensors are accepted without importing torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from model.training.evaluation.percent import percent


def as_int_array(x: Any) -> np.ndarray:
    """A label map (numpy array, nested sequence or torch tensor on any device) as an int64 numpy array of the same
    shape; bool counts as integer, a float dtype is a ``ValueError``."""
    if hasattr(x, "detach"):  # a torch tensor, possibly on an accelerator; torch itself is not imported here
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
        raise ValueError(f"label maps must be integer arrays, got dtype {x.dtype}")
    return x.astype(np.int64, copy=False)


class ConfusionMatrix:
    """A ``(num_classes, num_classes)`` int64 confusion matrix accumulated over label maps: rows GT, columns prediction.

    GT pixels equal to ``ignore_index`` or outside ``[0, num_classes)`` are ignored. Ratios are fractions in [0, 1].
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred: Any, gt: Any) -> None:
        """Add one pair of integer label maps of the same shape (numpy or torch, any integer dtype)."""
        pred, gt = as_int_array(pred), as_int_array(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from GT shape {gt.shape}")
        valid = (gt >= 0) & (gt < self.num_classes) & (gt != self.ignore_index)
        pred, gt = pred[valid], gt[valid]
        if pred.size and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"predicted labels must lie in [0, {self.num_classes}), got "
                             f"[{pred.min()}, {pred.max()}]")
        n = self.num_classes
        self.matrix += np.bincount(n * gt + pred, minlength=n * n).reshape(n, n)

    def per_class_iou(self) -> np.ndarray:
        """(num_classes,) float64 TP / (TP + FP + FN); NaN for classes absent from both GT and prediction."""
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(axis=0) + self.matrix.sum(axis=1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def miou(self, class_ids: Sequence[int] | None = None) -> float:
        """Mean IoU over ``class_ids`` (default all) ignoring NaN classes; NaN if every one of them is NaN."""
        iou = self.per_class_iou()
        if class_ids is not None:
            class_ids = list(class_ids)
            bad = [c for c in class_ids if not 0 <= c < self.num_classes]
            if bad:
                raise ValueError(f"class_ids {bad} are outside [0, {self.num_classes})")
            iou = iou[class_ids]
        iou = iou[~np.isnan(iou)]
        return float(iou.mean()) if iou.size else math.nan

    def pixel_accuracy(self) -> float:
        """Correct pixels / counted pixels; NaN when no pixel was counted."""
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else math.nan


def semantic_report(matrix: ConfusionMatrix, class_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """``{"mIoU", "pixel_accuracy", "per_class_iou", "num_classes", "num_pixels", "class_ids"}``, in percent.

    ``per_class_iou`` has one entry per class (``num_classes``), None for a NaN class; ``class_ids`` restricts
    the mIoU mean only.
    """
    return {
        "mIoU": percent(matrix.miou(class_ids)),
        "pixel_accuracy": percent(matrix.pixel_accuracy()),
        "per_class_iou": [percent(v) for v in matrix.per_class_iou()],
        "num_classes": matrix.num_classes,
        "num_pixels": int(matrix.matrix.sum()),
        "class_ids": None if class_ids is None else list(class_ids),
    }


def evaluate_semantic(pairs: Iterable[tuple[Any, Any]], num_classes: int, ignore_index: int = 255,
                      class_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """mIoU and pixel accuracy (percent) over ``(pred, gt)`` label-map pairs; see ``semantic_report``.

    Each pair is two integer label maps of one shape ``(H, W)`` (the shape may differ between pairs).
    ``class_ids`` restricts the mIoU mean to those classes (e.g. the unseen ones); pixel accuracy always counts
    every non-ignored pixel.
    """
    matrix = ConfusionMatrix(num_classes, ignore_index)
    for pred, gt in pairs:
        matrix.update(pred, gt)
    return semantic_report(matrix, class_ids)


__all__ = ["as_int_array", "ConfusionMatrix", "semantic_report", "evaluate_semantic"]
