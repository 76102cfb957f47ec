"""Evaluation scores polygon answers (issue 19): the same AP as the RLE answers they were traced from."""

from __future__ import annotations

import json

import numpy as np
from pycocotools import mask as mask_utils

from model.polygon import mask_to_polygons
from model.training.evaluation.coco_ap import evaluate_instances
from model.training.evaluation.command import main, with_rle_segmentations


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode()}


def scene():
    """A two-object ground truth and the same three predictions as RLE and as polygons."""
    h, w = 40, 50
    yy, xx = np.mgrid[:h, :w]
    objects = [(yy - 12) ** 2 + (xx - 14) ** 2 <= 64, (yy > 22) & (yy < 36) & (xx > 25) & (xx < 46)]
    gt = {"images": [{"id": 1, "height": h, "width": w}], "categories": [{"id": 7, "name": "thing"}],
          "annotations": [{"id": k + 1, "image_id": 1, "category_id": 7, "segmentation": rle(m), "iscrowd": 0,
                           "area": int(m.sum())} for k, m in enumerate(objects)]}
    # predictions: the first object shifted by two pixels, the second exact, and a false positive
    predicted = [np.roll(objects[0], 2, axis=1), objects[1], (yy < 5) & (xx > 40)]
    scores = [0.9, 0.8, 0.95]
    as_rle = [{"image_id": 1, "category_id": 7, "score": s, "segmentation": rle(m)} for s, m in zip(scores, predicted)]
    as_polygons = [{**r, "segmentation": mask_to_polygons(m, 0.0)} for r, m in zip(as_rle, predicted)]
    return gt, as_rle, as_polygons


def test_polygon_results_score_as_their_rle_results():
    gt, as_rle, as_polygons = scene()
    expected = evaluate_instances(gt, as_rle)
    got = evaluate_instances(gt, with_rle_segmentations(as_polygons, gt))
    assert 0 < expected["AP"] < 100
    assert got["AP"] == expected["AP"] and got["AP50"] == expected["AP50"]


def test_model_evaluate_scores_a_polygon_results_file(tmp_path, capsys):
    gt, as_rle, as_polygons = scene()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    reports = []
    for name, results in (("rle", as_rle), ("polygons", as_polygons)):
        (tmp_path / f"{name}.json").write_text(json.dumps(results))
        assert main(["--results", str(tmp_path / f"{name}.json"), "--coco", str(tmp_path / "gt.json"),
                     "--out", str(tmp_path / f"{name}-report.json")]) == 0
        reports.append(json.loads((tmp_path / f"{name}-report.json").read_text()))
    assert reports[0]["instances"]["AP"] == reports[1]["instances"]["AP"] > 0
