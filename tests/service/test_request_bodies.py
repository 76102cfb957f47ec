"""POST /segment's two bodies (multipart form, JSON), polygons, named vocabularies and strict fields (issue 19)."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from model.vocabularies import load_vocabulary
from service.request import ACCEPTED_FIELDS, FILE_HINT
from tests.service.conftest import png_bytes, segment
from tests.service.test_errors import assert_error

MASK_THRESHOLD = 0.3  # low enough that the tiny random model finds instances


@pytest.fixture
def client(make_client):
    return make_client(max_body_bytes=256 * 1024, max_concepts=5, max_concept_length=20, max_instances=50)


def post_json(client, body, **headers):
    return client.post("/segment", content=json.dumps(body).encode() if not isinstance(body, bytes) else body,
                       headers={"content-type": "application/json", **headers})


def without_timings(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k != "timings"}


def test_json_body_answers_exactly_as_the_form(client):
    image = png_bytes(33, 47, seed=5)
    fields = {"score_threshold": 0.0, "mask_threshold": MASK_THRESHOLD, "nms_iou": 0.9, "max_instances": 20,
              "semantic": "rle"}
    form = segment(client, image, ["cat", "dog"], **fields)
    assert form.status_code == 200, form.text
    encoded = base64.b64encode(image).decode()
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))  # MIME line breaks are allowed
    for value in (encoded, f"data:image/png;base64,{encoded}", wrapped):
        answer = post_json(client, {"image": value, "concepts": ["cat", "dog"], **fields})
        assert answer.status_code == 200, answer.text
        assert without_timings(answer.json()) == without_timings(form.json())
    assert form.json()["instances"], "no instances: the comparison would miss the masks"
    one_string = post_json(client, {"image": encoded, "concepts": "cat, dog", **fields})
    assert without_timings(one_string.json()) == without_timings(form.json())


def test_json_body_errors_name_the_field(client):
    good = base64.b64encode(png_bytes(20, 20)).decode()
    assert_error(post_json(client, {"image": "not base64!", "concepts": ["cat"]}), 400, "invalid_image", "image",
                 "base64")
    assert_error(post_json(client, {"image": "data:text/plain;base64,aGVsbG8=", "concepts": ["cat"]}), 415,
                 "unsupported_media_type", "image", "text/plain")
    assert_error(post_json(client, {"image": "data:image/png," + good, "concepts": ["cat"]}), 400, "invalid_image",
                 "base64")
    assert_error(post_json(client, {"image": base64.b64encode(b"hello").decode(), "concepts": ["cat"]}), 415,
                 "unsupported_media_type")
    for body in ([good], "cat", 3, None):
        assert_error(post_json(client, body), 422, "invalid_request", "object")
    assert_error(post_json(client, b'{"image": '), 400, "malformed_request", "JSON")
    assert_error(post_json(client, {"image": 12, "concepts": ["cat"]}), 422, "invalid_request", "image")
    assert_error(post_json(client, {"image": good, "concepts": [1, 2]}), 422, "invalid_request", "concepts")
    assert_error(post_json(client, {"image": good, "concepts": ["cat"], "score_threshold": "0.5"}), 422,
                 "invalid_request", "score_threshold")
    assert_error(post_json(client, {"image": good, "concepts": ["cat"], "max_instances": 2.5}), 422,
                 "invalid_request", "max_instances")
    assert_error(post_json(client, {"image": good, "concepts": ["cat"], "mask_format": "svg"}), 422,
                 "invalid_request", "mask_format")
    assert_error(post_json(client, {"image": good, "concepts": ["cat"], "threshold": 0.1}), 422,
                 "invalid_request", "'threshold'", "accepted: " + ", ".join(ACCEPTED_FIELDS))
    assert_error(post_json(client, b'{"image": "%s", "concepts": ["a"], "concepts": ["b"]}' % good.encode()), 422,
                 "invalid_request", "concepts", "twice")
    assert_error(post_json(client, {"concepts": ["cat"]}), 422, "invalid_request", "image", "required")
    assert post_json(client, {"image": good, "concepts": ["cat"], "score_threshold": 1}).status_code == 200


def test_strict_form_fields(client):
    image = png_bytes(20, 20)
    files = {"image": ("x.png", image, "image/png")}
    body = assert_error(client.post("/segment", files=files, data={"concepts": "cat", "threshold": "0.1"}), 422,
                        "invalid_request", "'threshold'", "accepted:")
    assert "score_threshold" in body["error"] and "mask_format" in body["error"]
    two_images = [("image", ("a.png", image, "image/png")), ("image", ("b.png", image, "image/png"))]
    assert_error(client.post("/segment", files=two_images, data={"concepts": "cat"}), 422, "invalid_request",
                 "image", "two images")
    assert_error(client.post("/segment", files=files, data={"concepts": "cat", "nms_iou": ["0.5", "0.6"]}), 422,
                 "invalid_request", "nms_iou", "once")
    # -F image=path (no @): the path arrives as text where the file belongs
    assert_error(client.post("/segment", data={"image": "photo.jpg", "concepts": "cat"}), 422, "invalid_request",
                 FILE_HINT)
    assert_error(client.post("/segment", files={"image": (None, "photo.jpg")}, data={"concepts": "cat"}), 422,
                 "invalid_request", FILE_HINT)
    as_array = segment(client, image, '["red circle", "blue star"]')
    assert as_array.json()["concepts"] == ["background", "red circle", "blue star"]
    assert_error(segment(client, image, '["red circle", 3]'), 422, "invalid_request", "JSON array of strings")
    assert_error(segment(client, image, "cat", polygon_tolerance=-1), 422, "invalid_request", "polygon_tolerance")


def test_polygon_answers_match_the_rle_answers(client):
    image = png_bytes(48, 64, seed=2)
    rle = segment(client, image, "cat,dog,bird", mask_threshold=MASK_THRESHOLD, score_threshold=0.0).json()
    poly = segment(client, image, "cat,dog,bird", mask_threshold=MASK_THRESHOLD, score_threshold=0.0,
                   mask_format="polygon", polygon_tolerance=0).json()
    assert rle["instances"], "no instances to compare"
    assert len(poly["instances"]) == len(rle["instances"])
    for r, p in zip(rle["instances"], poly["instances"]):
        assert {k: v for k, v in r.items() if k != "segmentation"} == {k: v for k, v in p.items()
                                                                     if k != "segmentation"}
        mask = mask_utils.decode(r["segmentation"]).astype(bool)
        rings = p["segmentation"]
        assert isinstance(rings, list) and all(len(ring) >= 6 and len(ring) % 2 == 0 for ring in rings)
        back = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(rings, 48, 64))).astype(bool)
        # tolerance 0: the pixel outline itself, holes included (keyhole cuts); diagonal pinch points may differ
        assert (back & mask).sum() / (back | mask).sum() >= 0.9
        assert not (mask & ~back).any()  # nothing of the mask is lost
    via_json = post_json(client, {"image": base64.b64encode(image).decode(), "concepts": ["cat", "dog", "bird"],
                                  "mask_threshold": MASK_THRESHOLD, "score_threshold": 0.0,
                                  "mask_format": "polygon", "polygon_tolerance": 0}).json()
    assert without_timings(via_json) == without_timings(poly)


def test_named_vocabularies(make_client):
    client = make_client(max_concepts=3)  # a named vocabulary is the service's own: the concept limit is not its
    image = png_bytes(24, 24, seed=1)
    coco = segment_vocabulary(client, image, "coco")
    assert coco.status_code == 200, coco.text
    assert coco.json()["concepts"] == load_vocabulary("coco")

    def misses() -> float:
        text = client.get("/metrics").text
        match = re.search(r'^zutis_text_embedding_cache_total\{outcome="miss"\} (\S+)$', text, re.M)
        return float(match.group(1)) if match else 0.0

    before = misses()
    again = segment_vocabulary(client, image, "coco")
    assert misses() == before, "a repeated named vocabulary encoded text again"
    assert without_timings(again.json()) == without_timings(coco.json())
    info = client.get("/info").json()
    assert info["vocabularies"] == ["coco", "coca", "imagenet_s919", "checkpoint"]
    checkpoint = segment_vocabulary(client, image, "checkpoint")
    assert checkpoint.json()["concepts"] == info["vocabulary"]
    files = {"image": ("x.png", image, "image/png")}
    assert_error(client.post("/segment", files=files, data={"vocabulary": "coco", "concepts": "cat"}), 422,
                 "invalid_request", "concepts and vocabulary")
    assert_error(client.post("/segment", files=files, data={"vocabulary": "pascal"}), 422, "invalid_request",
                 "vocabulary")
    assert_error(client.post("/segment", files=files), 422, "invalid_request", "concepts", "required",
                 "vocabulary=coco")
    by_json = post_json(client, {"image": base64.b64encode(image).decode(), "vocabulary": "coco", "semantic": "none"})
    assert without_timings(by_json.json()) == without_timings(coco.json())


def segment_vocabulary(client, image: bytes, name: str):
    return client.post("/segment", files={"image": ("x.png", image, "image/png")},
                       data={"vocabulary": name, "semantic": "none"})


def test_both_bodies_are_in_the_openapi_document(client):
    body = client.get("/openapi.json").json()["paths"]["/segment"]["post"]["requestBody"]["content"]
    form, as_json = body["multipart/form-data"]["schema"], body["application/json"]["schema"]
    assert form["properties"]["image"] == {"type": "string", "format": "binary",
                                           "description": "the image file (PNG, JPEG, WebP, BMP, GIF, TIFF)"}
    assert set(as_json["properties"]) == set(form["properties"]) == set(ACCEPTED_FIELDS)
    assert as_json["additionalProperties"] is False
    info = client.get("/info").json()
    assert info["request_bodies"]["content_types"] == ["multipart/form-data", "application/json"]
    assert "encoded body" in info["request_bodies"]["body_limit_applies_to"]
    assert info["mask_formats"] == ["rle", "polygon"]
    assert info["image_url"]["enabled"] is False


def test_the_body_limit_applies_to_the_encoded_json_body(make_client):
    client = make_client(max_body_bytes=64 * 1024)
    noisy = png_bytes(135, 135, seed=3)  # ~55 KB of PNG: under the limit as a file, over it as base64 in JSON
    assert len(noisy) < 62 * 1024 and len(base64.b64encode(noisy)) > 64 * 1024
    assert segment(client, noisy, "cat").status_code == 200
    assert_error(post_json(client, {"image": base64.b64encode(noisy).decode(), "concepts": ["cat"]}), 413,
                 "body_too_large", "65,536")


def test_the_named_vocabularies_are_the_official_ones_and_the_checkpoints():
    from model.vocabularies import VOCABULARIES
    from service.request import VOCABULARY_NAMES

    assert VOCABULARY_NAMES == (*VOCABULARIES, "checkpoint")
