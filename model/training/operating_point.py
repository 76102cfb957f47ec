"""Choosing the exported ``score_threshold``: the operating point a service answer is cut at.

Mask AP ranks every detection and so does not depend on a score floor; a service answer does: below the floor
nothing is returned. The floor is chosen on validation scenes (never the test scenes) as the one maximising
instance F1 at mask IoU >= 0.5: a detection is a true positive when it matches, greedily by descending score,
a not yet matched ground-truth object of its category with IoU >= 0.5 (``match_detections``).

This matching is not COCO AP's (``model.training.evaluation.coco_ap``, which ranks detections over ten IoU
thresholds, caps them per image and lets a detection on a crowd region go uncounted): it answers "is this answer
right?" at one threshold, for the F1 of one floor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def match_detections(gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]],
                     iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, int]:
    """Greedy per-(image, category) matching of COCO ``results`` against the COCO dataset ``gt``.

    In descending score order (ties in input order), each result takes the not yet matched ground-truth object of
    its image and category with the highest mask IoU, if that IoU is at least ``iou_threshold``; otherwise it is a
    false positive. Crowd objects (``iscrowd`` 1) are left out: a result on one is a false positive. Segmentations,
    GT and results alike, are compressed RLEs ``{"size": [H, W], "counts": str | bytes}`` (pycocotools ``iou``).

    Returns ``scores`` (N,) float64 and ``is_tp`` (N,) bool of the N results sorted by descending score, and the
    number of ground-truth objects (``iscrowd`` 0).
    """
    objects: dict[tuple[Any, int], list[dict[str, Any]]] = {}
    for ann in gt["annotations"]:
        if not ann.get("iscrowd", 0):
            objects.setdefault((ann["image_id"], int(ann["category_id"])), []).append(ann["segmentation"])
    order = sorted(range(len(results)), key=lambda i: -float(results[i]["score"]))
    matched = {key: np.zeros(len(segs), dtype=bool) for key, segs in objects.items()}
    scores = np.array([float(results[i]["score"]) for i in order], dtype=np.float64)
    is_tp = np.zeros(len(order), dtype=bool)
    for n, i in enumerate(order):
        res = results[i]
        key = (res["image_id"], int(res["category_id"]))
        if key not in objects:
            continue
        ious = mask_utils.iou([res["segmentation"]], objects[key], [0] * len(objects[key]))[0]
        ious = np.where(matched[key], -1.0, ious)
        best = int(np.argmax(ious))
        if ious[best] >= iou_threshold:
            matched[key][best] = True
            is_tp[n] = True
    return scores, is_tp, sum(len(s) for s in objects.values())


def operating_points(scores: np.ndarray, is_tp: np.ndarray, num_gt: int,
                     thresholds: Sequence[float]) -> list[dict[str, float]]:
    """Precision, recall and F1 (0-1) of the detections with ``score > t`` for each threshold ``t``."""
    points = []
    for t in thresholds:
        kept = scores > t
        tp = int(is_tp[kept].sum())
        precision = tp / max(1, int(kept.sum()))
        recall = tp / max(1, num_gt)
        f1 = 2 * precision * recall / max(1e-12, precision + recall)
        points.append({"score_threshold": float(t), "precision": precision, "recall": recall, "f1": f1,
                       "detections": int(kept.sum())})
    return points


DEFAULT_CANDIDATES = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05 .. 0.95


def choose_score_threshold(gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]],
                           candidates: Sequence[float] = DEFAULT_CANDIDATES) -> tuple[float, list[dict[str, float]]]:
    """The candidate with the highest F1 at IoU 0.5 (the lowest such on ties) and every candidate's point."""
    if not candidates:
        raise ValueError("need at least one candidate threshold")
    points = operating_points(*match_detections(gt, results), thresholds=sorted(candidates))
    best = max(points, key=lambda p: (p["f1"], -p["score_threshold"]))
    return best["score_threshold"], points


__all__ = ["match_detections", "operating_points", "choose_score_threshold", "DEFAULT_CANDIDATES"]
