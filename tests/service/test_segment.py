"""POST /segment through the real app: the answer, batching across vocabularies, and every error case."""

from __future__ import annotations

import io
import json
import re

import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from model.predictor import Predictor
from model.rle import decode_semantic_png
from service.schema import SegmentResponse, build_response
from tests.service.conftest import png_bytes, segment, segment_together
from tests.service.test_upload import oriented_jpeg

# The tiny random model's mask probabilities sit around 0.43-0.48: this threshold gives it a few instances.
MASK_THRESHOLD = 0.46


def without_timings(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "timings"}


def metric_value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    assert match, f"{sample} not in /metrics"
    return float(match.group(1))


def test_segment_answers_the_shared_schema_and_matches_the_predictor(make_client, service_checkpoint):
    client = make_client()
    image = png_bytes(37, 53, seed=3)
    answer = segment(client, image, ["dog", "Cat , dog", " "], mask_threshold=MASK_THRESHOLD, semantic="png")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    SegmentResponse.model_validate(body)
    assert body["image"] == {"width": 53, "height": 37}
    assert body["concepts"] == ["background", "dog", "cat"]  # repeated + comma-separated, merged, in order
    for header in ("x-queue-time", "x-inference-time", "x-total-time"):
        assert float(answer.headers[header]) >= 0.0
    assert float(answer.headers["x-total-time"]) == body["timings"]["total_ms"]

    # The same answer as the predictor in-process (same embeddings: the service's cache computes them the same way),
    # with the service's default precision and runtime (on this CPU: bfloat16 on OpenVINO where they exist).
    predictor = Predictor.from_checkpoint(service_checkpoint, "cpu", runtime="auto")
    reference = predictor.predict([Image.open(io.BytesIO(image))], ["dog", "cat"], mask_threshold=MASK_THRESHOLD)[0]
    expected = json.loads(build_response(reference, predictor.model_id, "png").model_dump_json())
    assert without_timings(body) == without_timings(expected)

    schema = client.get("/openapi.json").json()["paths"]["/segment"]["post"]["responses"]["200"]
    assert schema["content"]["application/json"]["schema"]["$ref"].endswith("/SegmentResponse")  # /docs shows it

    semantic = decode_semantic_png(body["semantic"]["png"])
    assert semantic.shape == (37, 53)
    for instance in body["instances"]:
        assert mask_utils.decode(instance["segmentation"]).shape == (37, 53)


def test_semantic_formats_and_parameters(make_client):
    client = make_client()
    image = png_bytes(30, 30, seed=1)
    rle = segment(client, image, "a,b,c,d,e,f", semantic="rle", mask_threshold=0.3).json()
    assert rle["semantic"]["format"] == "rle"
    assert all(seg["concept"] == rle["concepts"][seg["concept_index"]] for seg in rle["semantic"]["segments"])
    none = segment(client, image, "a,b,c,d,e,f", semantic="none", mask_threshold=0.3).json()
    assert none["semantic"] is None
    assert none["instances"] == rle["instances"]
    capped = segment(client, image, "a,b,c,d,e,f", semantic="none", mask_threshold=0.3, max_instances=0).json()
    assert capped["instances"] == []
    strict = segment(client, image, "a,b,c,d,e,f", semantic="none", mask_threshold=0.3, score_threshold=1.0).json()
    assert strict["instances"] == []


@pytest.mark.slow
def test_concurrent_mixed_vocabularies_share_batches_and_answer_as_alone(make_client):
    client = make_client(max_batch_size=8, max_batch_delay_ms=300, postprocess_workers=2)
    vocabularies = ["cat,dog", "red circle, blue star, green square", "a,b,c,d,e,f", "dog"]
    requests = [(png_bytes(24 + 5 * (i % 7), 60 - 3 * (i % 5), seed=i), vocabularies[i % len(vocabularies)])
                for i in range(16)]

    together = segment_together(client, requests, mask_threshold=MASK_THRESHOLD)
    assert [r.status_code for r in together] == [200] * len(requests)
    metrics = client.get("/metrics").text
    batches = metric_value(metrics, "zutis_batch_size_count")
    singles = metric_value(metrics, 'zutis_batch_size_bucket{le="1.0"}')
    assert singles < batches, "no forward pass had more than one image"
    assert max(int(r.headers["x-batch-size"]) for r in together) > 1
    assert metric_value(metrics, "zutis_batch_size_sum") == len(requests)  # every image once, warm-up not counted

    alone = [segment(client, image, concepts, mask_threshold=MASK_THRESHOLD) for image, concepts in requests]
    assert all(int(r.headers["x-batch-size"]) == 1 for r in alone)
    assert [without_timings(r.json()) for r in together] == [without_timings(r.json()) for r in alone]
    assert sum(len(r.json()["instances"]) for r in alone) > 0, "no instances: the comparison would miss the masks"


def test_phone_photo_is_answered_upright(make_client):
    client = make_client()
    data, _ = oriented_jpeg(36, 64, orientation=6, format="MPO")
    files = {"image": ("phone.jpg", data, "image/jpeg")}
    answer = client.post("/segment", files=files, data={"concepts": "cat", "mask_threshold": str(MASK_THRESHOLD)})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["image"] == {"width": 64, "height": 36}
    assert decode_semantic_png(body["semantic"]["png"]).shape == (36, 64)
    for instance in body["instances"]:
        assert instance["segmentation"]["size"] == [36, 64]

    stored = make_client(exif_orientation=False)
    assert stored.post("/segment", files=files, data={"concepts": "cat"}).json()["image"] == {"width": 36,
                                                                                              "height": 64}
