"""The client's JSON bodies, polygon answers and named vocabularies (issue 19), against the real service."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from tests.client.test_cli import CONCEPTS, EXAMPLES, zutis_client
from zutis_client import Client, ZutisError
from zutis_client.client import segment_fields, segment_request
from zutis_client.polygon import decode_polygons


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_decode_polygons_agrees_with_pycocotools():
    rng = np.random.default_rng(0)
    for _ in range(30):
        h, w = rng.integers(10, 60, size=2)
        rings = []
        for _ in range(rng.integers(1, 3)):
            n = int(rng.integers(3, 9))
            centre = rng.uniform([0, 0], [w, h])
            angles = np.sort(rng.uniform(0, 2 * np.pi, n))
            radius = rng.uniform(2, 15, n)
            xs = centre[0] + radius * np.cos(angles)  # partly outside the image at times
            ys = centre[1] + radius * np.sin(angles)
            rings.append(np.stack([xs, ys], 1).ravel().tolist())
        ours = decode_polygons(rings, (h, w))
        theirs = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(rings, int(h), int(w)))).astype(bool)
        assert np.array_equal(ours, theirs), (ours != theirs).sum()
    square = decode_polygons([[2, 1, 5, 1, 5, 4, 2, 4]], (6, 7))
    assert square.sum() == 9 and square[1:4, 2:5].all()
    with pytest.raises(ZutisError):
        decode_polygons([[1, 2, 3, 4]], (5, 5))


def test_request_fields_for_both_bodies():
    fields = segment_fields(["cat", "dog"], None, score_threshold=0.5, mask_format="polygon", nms_iou=None)
    assert fields == {"concepts": ["cat", "dog"], "score_threshold": 0.5, "mask_format": "polygon"}
    as_json = segment_request(b"\x89PNG", fields, "json")
    assert as_json == {"json": {"image": "iVBORw==", **fields}}
    form = segment_request(b"\x89PNG", fields, "multipart")
    assert form["data"] == {"concepts": ["cat", "dog"], "score_threshold": "0.5", "mask_format": "polygon"}
    assert segment_fields(None, "coco") == {"vocabulary": "coco"}
    for bad in ((None, None), (["cat"], "coco")):
        with pytest.raises(ZutisError):
            segment_fields(*bad)


@pytest.mark.integration
def test_client_json_bodies_polygons_and_vocabularies(live_url):
    with Client(live_url) as client:
        rle = client.segment(EXAMPLES[0], CONCEPTS)
        poly = client.segment(EXAMPLES[0], CONCEPTS, mask_format="polygon", send="json")
        assert rle.instances and len(poly.instances) == len(rle.instances)
        for r, p in zip(rle.instances, poly.instances):
            assert (r.concept, r.score, r.bbox, r.area) == (p.concept, p.score, p.bbox, p.area)
            assert r.mask_format == "rle" and p.mask_format == "polygon"
            assert p.mask.shape == r.mask.shape == (rle.height, rle.width)
            assert iou(p.mask, r.mask) >= 0.9
            coco = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(p.segmentation, rle.height,
                                                                             rle.width))).astype(bool)
            assert np.array_equal(p.mask, coco)  # the client's rasteriser is pycocotools' own
        same = client.segment(EXAMPLES[0], CONCEPTS, send="json")
        assert same.raw["instances"] == rle.raw["instances"]
        assert (same.semantic_map == rle.semantic_map).all()
        coco = client.segment(EXAMPLES[0], vocabulary="coco", semantic="none")
        assert len(coco.concepts) == 81 and coco.concepts[0] == "background"
        assert poly.overlay(EXAMPLES[0]).size == (rle.width, rle.height)


@pytest.mark.integration
def test_cli_mask_format_and_json(live_url, tmp_path):
    out = tmp_path / "answers.json"
    done = zutis_client("--url", live_url, "segment", str(EXAMPLES[0]), "--concepts", *CONCEPTS, "--mask-format",
                        "polygon", "--json", "--out", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    answer = json.loads(out.read_text())["results"][0]["answer"]
    assert answer["instances"] and all(isinstance(i["segmentation"], list) for i in answer["instances"])
    neither = zutis_client("--url", live_url, "segment", str(EXAMPLES[0]))
    assert neither.returncode == 2 and "--concepts or --vocabulary" in neither.stderr
