"""model.answer, the one encoder of the answer: today's answers are byte-identical to those of the code before it
existed, and polygon answers reproduce their masks.

The expected digests in ``tests/model/data/answer_bytes_*.json`` were written by the pre-refactor code path
(``service.schema.build_response(...).model_dump_json()`` at commit e09ff7d, the masks encoded to RLE inside
``model.postprocess``) for the same synthetic predictions and, with the shipped demo checkpoint, for
``examples/shapes-*.png``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from model.answer import (AnswerFormat, SegmentResponse, Timings, build_response, encode_answer,
                          segmentation_to_mask, segmentation_to_rle)
from model.postprocess import InstancePrediction, Prediction
from model.rle import masks_to_boxes_xywh

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[2]
DEMO_CHECKPOINT = REPO / "weights" / "zutis-shapes.safetensors"


def synthetic(seed: int) -> Prediction:
    """The same predictions the golden digests were made from (the same RNG calls in the same order)."""
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(5, 60)), int(rng.integers(5, 60))
    n = int(rng.integers(0, 6))
    masks = torch.from_numpy(rng.random((n, h, w)) < rng.random((n, 1, 1)))
    concepts = ["background"] + [f"c{k} \u00e9\"\\" for k in range(1, 4)]
    scores = rng.random(n).astype(np.float32) ** 3
    labels = rng.integers(1, 4, n)
    boxes = masks_to_boxes_xywh(masks).tolist()
    instances = [InstancePrediction(int(lab), concepts[int(lab)], float(s), tuple(b), int(m.sum()), m)
                 for lab, s, b, m in zip(labels, scores, boxes, masks)]
    semantic = rng.integers(0, 4, (h, w)).astype(np.uint16) if seed % 3 else None
    return Prediction((h, w), concepts, instances, semantic)


def test_answers_are_byte_identical_to_the_pre_refactor_encoder():
    golden = json.loads((DATA / "answer_bytes_synthetic.json").read_text())
    checked = 0
    for seed in range(12):
        prediction = synthetic(seed)
        for semantic in ("png", "rle", "none"):
            timings = Timings(queue_ms=seed * 0.001, inference_ms=1.25 + seed, total_ms=1e-05 * seed)
            body = encode_answer(prediction, "m@0123", AnswerFormat(semantic=semantic), timings).model_dump_json()
            assert hashlib.sha256(body.encode()).hexdigest() == golden[f"{seed}-{semantic}"], (seed, semantic)
            assert build_response(prediction, "m@0123", semantic, timings).model_dump_json() == body
            checked += 1
            if seed == 4:
                indented = encode_answer(prediction, "m@0123", AnswerFormat(semantic=semantic), timings)
                assert indented.model_dump_json(indent=2) == golden[f"{seed}-{semantic}-indent2"]
    assert checked == 36


@pytest.mark.slow
@pytest.mark.skipif(not DEMO_CHECKPOINT.is_file(), reason="the demo checkpoint is not in this checkout")
def test_demo_checkpoint_answers_are_byte_identical_to_the_pre_refactor_ones():
    from model.predictor import Predictor

    golden = json.loads((DATA / "answer_bytes_shapes.json").read_text())
    # The golden digests were written in float32 on torch, the precision of exact parity (auto may be bfloat16)
    predictor = Predictor.from_checkpoint(DEMO_CHECKPOINT, "cpu", "float32", runtime="torch")
    for k in (1, 2, 3):
        image = Image.open(REPO / "examples" / f"shapes-{k}.png")
        prediction = predictor.predict([image], ["red circle", "blue star", "green heart", "yellow square"])[0]
        assert len(prediction.instances) == golden[f"shapes-{k}-instances"]
        for semantic in ("png", "rle"):
            body = encode_answer(prediction, predictor.model_id, AnswerFormat(semantic=semantic)).model_dump_json()
            assert hashlib.sha256(body.encode()).hexdigest() == golden[f"shapes-{k}-{semantic}"], (k, semantic)


def blobs(seed: int, hw=(64, 80)) -> np.ndarray:
    """An (H, W) bool mask of a few overlapping discs and a rectangle (two or more parts, some with corners)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    mask = np.zeros(hw, dtype=bool)
    for _ in range(3):
        cy, cx, r = rng.integers(10, hw[0] - 10), rng.integers(10, hw[1] - 10), rng.integers(4, 14)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    mask[2:9, 3:30] = True
    return mask


def test_polygon_answers_rasterise_back_to_their_masks():
    masks = torch.from_numpy(np.stack([blobs(s) for s in range(6)]))
    instances = [InstancePrediction(1, "cat", 0.5, tuple(b), int(m.sum()), m)
                 for b, m in zip(masks_to_boxes_xywh(masks).tolist(), masks)]
    prediction = Prediction((64, 80), ["background", "cat"], instances, None)
    exact = encode_answer(prediction, "m", AnswerFormat(semantic="none", mask_format="polygon",
                                                        polygon_tolerance=0.0))
    simplified = encode_answer(prediction, "m", AnswerFormat(semantic="none", mask_format="polygon"))
    for mask, a, b in zip(masks.numpy(), exact.instances, simplified.instances):
        assert isinstance(a.segmentation, list) and all(len(r) >= 6 for r in a.segmentation)
        # pycocotools, independently of model.polygon's own rasteriser
        rings = mask_utils.frPyObjects(a.segmentation, 64, 80)
        back = mask_utils.decode(mask_utils.merge(rings)).astype(bool)
        assert (back != mask).sum() <= 2  # exact up to a pinch point where parts touch diagonally
        rough = segmentation_to_mask(b.segmentation, (64, 80))
        assert (rough & mask).sum() / (rough | mask).sum() >= 0.9  # the floor the issue sets
        assert sum(len(r) for r in b.segmentation) < sum(len(r) for r in a.segmentation)
    # RLE and polygon answers agree on everything but the encoding
    rle = encode_answer(prediction, "m", AnswerFormat(semantic="none")).model_dump()
    poly = simplified.model_dump()
    for r, p in zip(rle["instances"], poly["instances"]):
        assert {k: v for k, v in r.items() if k != "segmentation"} == \
            {k: v for k, v in p.items() if k != "segmentation"}
    SegmentResponse.model_validate_json(simplified.model_dump_json())


def test_segmentation_to_rle_reads_both_formats():
    mask = blobs(3)
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    as_dict = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}
    assert segmentation_to_rle(as_dict, mask.shape) == as_dict
    assert segmentation_to_rle({**as_dict, "counts": rle["counts"]}, mask.shape) == as_dict
    polygons = encode_answer(Prediction(mask.shape, ["background", "x"], [
        InstancePrediction(1, "x", 1.0, (0, 0, 1, 1), int(mask.sum()), mask)], None), "m",
        AnswerFormat(mask_format="polygon", polygon_tolerance=0.0)).instances[0].segmentation
    from_polygons = mask_utils.decode(segmentation_to_rle(polygons, mask.shape)).astype(bool)
    assert (from_polygons != mask).sum() <= 2


def test_polygons_carry_holes_through_a_keyhole_cut():
    yy, xx = np.mgrid[:60, :90]
    r2 = (yy - 30) ** 2 + (xx - 32) ** 2
    ring = (r2 <= 24 ** 2) & (r2 > 12 ** 2)  # an annulus ...
    island = r2 <= 4 ** 2  # ... with an island in its hole
    square_with_two_holes = np.zeros((60, 90), dtype=bool)
    square_with_two_holes[5:20, 65:88] = True
    square_with_two_holes[8:12, 68:72] = False
    square_with_two_holes[13:17, 75:80] = False
    mask = ring | island | square_with_two_holes
    from model.polygon import mask_to_polygons

    rings = mask_to_polygons(mask, tolerance=0.0)
    assert len(rings) == 3  # one ring per connected part: annulus (+ its hole), island, square (+ two holes)
    back = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(rings, 60, 90))).astype(bool)
    assert (back != mask).sum() == 0
    simplified = mask_to_polygons(mask, tolerance=1.0)
    back = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(simplified, 60, 90))).astype(bool)
    assert (back & mask).sum() / (back | mask).sum() >= 0.95
    assert not back[30, 32 + 8] and not back[10, 70] and back[30, 32]  # inside the holes


@pytest.mark.parametrize("tolerance", [0.0, 1.0])
def test_polygons_follow_the_object_wherever_it_lies(tolerance):
    # The outline is traced in the object's box: moving the object (or growing the image around it) moves its
    # polygons by exactly that much, its box flush with the image's corner included.
    from model.polygon import mask_to_polygons

    shape = blobs(3)
    at_origin = mask_to_polygons(shape, tolerance)
    for dy, dx, hw in [(0, 0, (64, 80)), (37, 211, (480, 640)), (416, 560, (480, 640))]:
        canvas = np.zeros(hw, dtype=bool)
        canvas[dy:dy + 64, dx:dx + 80] = shape
        moved = [[v - (dx if k % 2 == 0 else dy) for k, v in enumerate(r)] for r in mask_to_polygons(canvas, tolerance)]
        assert moved == at_origin, (dy, dx)


def test_no_library_module_imports_the_service_any_more():
    from tests.model.test_boundary import imported_modules, library_modules

    importers = {p.relative_to(REPO / "model").as_posix() for p in library_modules()
                 if any(m == "service" or m.startswith("service.") for m in imported_modules(p))}
    assert importers == set()  # model.predict used to import service.schema; model.answer owns the answer now


def test_rle_encoding_reuses_the_predictors_mask_tensor():
    from model.answer import _stacked

    masks = torch.rand(4, 5, 6) > 0.5
    views = list(masks)  # what model.postprocess keeps per instance
    assert _stacked(views) is masks  # no copy on the hot path
    assert torch.equal(_stacked(views[::-1]), masks.flip(0)) and torch.equal(_stacked(views[:3]), masks[:3])
