"""A bounded property-based fuzz of POST /segment through the real app (lifespan, middlewares, tiny model).

Whatever the client sends (odd images, parameters, concept lists, content types, headers, broken multipart),
the answer is never a 5xx (multipart forms, JSON bodies and raw bytes), and every error has the one JSON body shape with a known type and its status. The
examples are derandomised (the same every run, so CI is reproducible) and bounded (60 per test, seconds on an idle
CPU); they reach 200, 400 (form, image), 415 and 422 answers (counted once by hand). Set ``ZUTIS_FUZZ_EXAMPLES``
for a longer, random run on a developer machine.
"""

from __future__ import annotations

import base64
import io
import json
import os

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.app import create_app
from service.errors import ERROR_STATUS
from service.schema import SegmentResponse
from service.settings import Settings
from tests.service.conftest import wait_until_ready

EXAMPLES = int(os.environ.get("ZUTIS_FUZZ_EXAMPLES", "0")) or None
FUZZ = settings(max_examples=EXAMPLES or 60, derandomize=EXAMPLES is None, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _encoded(size: tuple[int, int], mode: str, format: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    options = {"save_all": True} if format == "MPO" else {}
    Image.fromarray(pixels).convert(mode).save(buffer, format=format, **options)
    return buffer.getvalue()


good_images = st.builds(_encoded, st.tuples(st.integers(1, 48), st.integers(1, 48)),
                        st.sampled_from(["RGB", "L", "RGBA", "P", "1"]),
                        st.sampled_from(["PNG", "GIF", "BMP", "TIFF", "WEBP"]), st.integers(0, 9))
jpegs = st.builds(_encoded, st.tuples(st.integers(1, 48), st.integers(1, 48)), st.just("RGB"),
                  st.sampled_from(["JPEG", "MPO"]), st.integers(0, 9))
images = st.one_of(
    good_images,
    jpegs,
    st.binary(max_size=256),  # noise
    good_images.map(lambda data: data[: len(data) // 2]),  # truncated
    good_images.flatmap(lambda data: st.integers(0, max(0, len(data) - 1)).map(
        lambda i: data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:] if data else data)),  # one byte flipped
)
texts = st.text(max_size=40)
# allow_subnormal=False: the tests flush denormals to zero (tests/conftest.py), which hypothesis detects.
weird_numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False).map(repr),
                          st.integers(-5, 10**12).map(str), texts,
                          st.sampled_from(["nan", "inf", "-inf", "1e309", "", " ", "0x10", "1,5", "true", "null"]))
# Mostly sensible values with the odd weird one, so that requests get past the first check often enough to reach
# the image decoder and the model.
unit = st.floats(0.0, 0.99, allow_subnormal=False).map(str)
fractions = st.one_of(unit, unit, weird_numbers)
counts = st.one_of(st.integers(0, 5).map(str), st.integers(0, 5).map(str), weird_numbers)
concept_lists = st.one_of(st.just(["cat"]), st.just(["red circle, blue star", "cat"]),
                          st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=3),
                          st.lists(texts, max_size=7))
fields = st.fixed_dictionaries({"concepts": concept_lists}, optional={
    "score_threshold": fractions,
    "mask_threshold": fractions,
    "nms_iou": fractions,
    "max_instances": counts,
    "semantic": st.one_of(st.sampled_from(["png", "rle", "none"]), texts),
    "mask_format": st.one_of(st.sampled_from(["rle", "polygon"]), texts),
    "polygon_tolerance": st.one_of(st.sampled_from(["0", "1", "2.5"]), weird_numbers),
    "vocabulary": st.one_of(st.sampled_from(["coco", "checkpoint"]), texts),
    "unexpected": texts,
})


def assert_well_formed(answer) -> None:
    assert answer.status_code < 500, (answer.status_code, answer.text)
    if answer.status_code == 200:
        SegmentResponse.model_validate_json(answer.content)
        return
    body = answer.json()
    assert set(body) == {"error", "type"} and isinstance(body["error"], str) and body["error"], body
    assert body["type"] in ERROR_STATUS and ERROR_STATUS[body["type"]] == answer.status_code, body


@pytest.fixture(scope="module")
def fuzz_client(service_checkpoint):
    settings = Settings(checkpoint=service_checkpoint, device="cpu", max_batch_size=2, max_concepts=5,
                        max_concept_length=20, max_image_pixels=40 * 40, max_body_bytes=64 * 1024)
    with TestClient(create_app(settings)) as client:
        wait_until_ready(client)
        yield client


@FUZZ
@given(image=st.one_of(images, images, st.none()), data=fields,
       filename=st.one_of(st.just("x.png"), texts), content_type=st.one_of(st.just("image/png"), texts))
def test_fuzz_multipart_forms(fuzz_client, image, data, filename, content_type):
    files = None if image is None else {"image": (filename or "x", image, content_type or "application/octet-stream")}
    try:
        answer = fuzz_client.post("/segment", files=files, data=data)
    except (UnicodeEncodeError, ValueError):
        return  # the client library cannot encode this form (e.g. a surrogate in a field name): nothing was sent
    assert_well_formed(answer)


@FUZZ
@given(body=st.binary(max_size=512), content_type=st.one_of(
    st.none(), st.sampled_from(["multipart/form-data", "multipart/form-data; boundary=b",
                                "multipart/form-data; boundary=", "application/json", "text/plain",
                                "application/x-www-form-urlencoded", "image/png"]), texts),
       authorization=st.one_of(st.none(), texts))
def test_fuzz_raw_bodies_and_headers(fuzz_client, body, content_type, authorization):
    headers = {}
    if content_type is not None:
        headers["content-type"] = content_type
    if authorization is not None:
        headers["authorization"] = authorization
    try:
        answer = fuzz_client.post("/segment", content=body, headers=headers)
    except (UnicodeEncodeError, ValueError):
        return  # not a sendable header value
    assert_well_formed(answer)



# JSON bodies: the same fields with JSON's own types, right and wrong.
json_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_subnormal=False), texts,
                        st.lists(st.one_of(texts, st.integers()), max_size=3), st.dictionaries(texts, texts, max_size=2))
json_unit = st.one_of(st.floats(0.0, 0.99, allow_subnormal=False), st.floats(0.0, 0.99, allow_subnormal=False),
                      json_values)
base64_images = st.one_of(
    images.map(lambda data: base64.b64encode(data).decode()),
    images.map(lambda data: "data:image/png;base64," + base64.b64encode(data).decode()),
    st.tuples(st.sampled_from(["text/plain", "image/png", "", "image/png;charset=x"]), images).map(
        lambda t: f"data:{t[0]};base64," + base64.b64encode(t[1]).decode()),
    texts,
    json_values,
)
json_fields = st.fixed_dictionaries({}, optional={
    "image": base64_images,
    "image_url": st.one_of(texts, st.just("http://127.0.0.1:9/x.png"), json_values),
    "concepts": st.one_of(st.just(["cat"]), st.just("cat, dog"), concept_lists, json_values),
    "vocabulary": st.one_of(st.sampled_from(["coco", "checkpoint"]), json_values),
    "score_threshold": json_unit,
    "mask_threshold": json_unit,
    "nms_iou": json_unit,
    "max_instances": st.one_of(st.integers(0, 5), json_values),
    "semantic": st.one_of(st.sampled_from(["png", "rle", "none"]), json_values),
    "mask_format": st.one_of(st.sampled_from(["rle", "polygon"]), json_values),
    "polygon_tolerance": st.one_of(st.floats(0, 3, allow_subnormal=False), json_values),
    "unexpected": json_values,
})


# Mostly well-formed requests (so that many reach the decoder and the model), with the odd wrong value.
mostly_good_json = st.fixed_dictionaries(
    {"image": st.one_of(good_images, good_images, images).map(lambda data: base64.b64encode(data).decode()),
     "concepts": st.one_of(st.just(["cat"]), st.just("cat, dog"), concept_lists)},
    optional={"score_threshold": json_unit, "mask_threshold": st.floats(0.0, 0.99, allow_subnormal=False),
              "semantic": st.sampled_from(["png", "rle", "none"]), "mask_format": st.sampled_from(["rle", "polygon"]),
              "polygon_tolerance": st.one_of(st.floats(0, 3, allow_subnormal=False), json_values)})


@FUZZ
@given(body=st.one_of(mostly_good_json, mostly_good_json, json_fields, json_values))
def test_fuzz_json_bodies(fuzz_client, body):
    try:
        content = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    except (UnicodeEncodeError, ValueError):
        return
    answer = fuzz_client.post("/segment", content=content, headers={"content-type": "application/json"})
    assert_well_formed(answer)
