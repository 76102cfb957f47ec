"""model.training.operating_point: greedy IoU matching, operating points and the chosen score floor, on hand-made
masks."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from model.training.operating_point import choose_score_threshold, match_detections, operating_points


def _rle(rows: slice, cols: slice, size: int = 10) -> dict:
    m = np.zeros((size, size), np.uint8)
    m[rows, cols] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": [size, size], "counts": rle["counts"].decode()}


A, B = _rle(slice(0, 4), slice(0, 4)), _rle(slice(5, 9), slice(5, 9))
GT = {"images": [{"id": 1}], "categories": [{"id": 1}, {"id": 2}],
      "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": A, "iscrowd": 0},
                      {"id": 2, "image_id": 1, "category_id": 2, "segmentation": B, "iscrowd": 0}]}


def test_each_object_is_matched_once_by_the_best_scored_detection_of_its_category():
    results = [{"image_id": 1, "category_id": 1, "segmentation": A, "score": 0.9},   # TP
               {"image_id": 1, "category_id": 1, "segmentation": A, "score": 0.8},   # duplicate: FP
               {"image_id": 1, "category_id": 1, "segmentation": B, "score": 0.7},   # wrong place: FP
               {"image_id": 1, "category_id": 2, "segmentation": _rle(slice(5, 9), slice(5, 7)), "score": 0.3}]
    # the last covers half of B: IoU exactly 0.5 counts
    scores, is_tp, num_gt = match_detections(GT, results)
    assert scores.tolist() == [0.9, 0.8, 0.7, 0.3] and is_tp.tolist() == [True, False, False, True]
    assert num_gt == 2


def test_operating_points_and_choice_follow_f1():
    scores, is_tp = np.array([0.9, 0.8, 0.7, 0.3]), np.array([True, False, False, True])
    points = operating_points(scores, is_tp, 2, [0.2, 0.5, 0.85])
    assert [p["detections"] for p in points] == [4, 3, 1]
    assert points[0]["precision"] == 0.5 and points[0]["recall"] == 1.0 and points[0]["f1"] == pytest.approx(2 / 3)
    assert points[2]["precision"] == 1.0 and points[2]["recall"] == 0.5 and points[2]["f1"] == pytest.approx(2 / 3)
    results = [{"image_id": 1, "category_id": 1, "segmentation": A, "score": 0.9},
               {"image_id": 1, "category_id": 2, "segmentation": B, "score": 0.6},
               {"image_id": 1, "category_id": 2, "segmentation": A, "score": 0.4}]
    chosen, pts = choose_score_threshold(GT, results, [0.3, 0.5, 0.7])
    assert chosen == 0.5 and [p["f1"] for p in pts] == pytest.approx([0.8, 1.0, 2 / 3])
    with pytest.raises(ValueError, match="candidate"):
        choose_score_threshold(GT, results, [])
