"""/metrics: exactly the names, types and buckets of docs/serving.md, and values that follow the traffic."""

from __future__ import annotations

import re

import torch
from prometheus_client.parser import text_string_to_metric_families

from model.predictor import resolve_dtype
from service.metrics import Metrics
from tests.service.conftest import png_bytes, segment

LATENCY_BUCKETS = [.005, .01, .025, .05, .075, .1, .25, .5, .75, 1, 2.5, 5, 7.5, 10, 15, 30, 60]
CONTRACT = {
    "zutis_requests": "counter", "zutis_requests_rejected": "counter", "zutis_text_embedding_cache": "counter",
    "zutis_request_duration_seconds": "histogram", "zutis_queue_wait_seconds": "histogram",
    "zutis_inference_duration_seconds": "histogram", "zutis_batch_size": "histogram",
    "zutis_instances_per_image": "histogram", "zutis_batch_padding_ratio": "histogram",
    "zutis_queue_depth": "gauge", "zutis_inflight_requests": "gauge",
    "zutis_ready": "gauge", "zutis_build_info": "gauge",
}


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("zutis_")
            and not f.name.endswith("_created")}


def buckets(family) -> list[float]:
    return [float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"]


def sample(family, suffix: str = "", **labels) -> float:
    [value] = [s.value for s in family.samples if s.name == family.name + suffix and s.labels == labels]
    return value


def test_metric_names_types_and_buckets(make_client):
    client = make_client()
    assert segment(client, png_bytes(20, 30), "cat, dog").status_code == 200
    assert segment(client, png_bytes(20, 30), "dog, horse").status_code == 200
    assert segment(client, b"junk", "cat").status_code == 415
    answer = client.get("/metrics")
    assert answer.headers["content-type"].startswith("text/plain")
    found = families(answer.text)
    assert {name: f.type for name, f in found.items()} == CONTRACT
    for name in ("zutis_request_duration_seconds", "zutis_queue_wait_seconds", "zutis_inference_duration_seconds"):
        assert buckets(found[name]) == LATENCY_BUCKETS, name
    assert buckets(found["zutis_batch_size"]) == [1, 2, 4, 8, 16, 32, 64]
    assert buckets(found["zutis_batch_padding_ratio"]) == [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0]

    requests = found["zutis_requests"]
    assert sample(requests, "_total", route="/segment", code="200") == 2
    assert sample(requests, "_total", route="/segment", code="415") == 1
    assert sample(found["zutis_requests_rejected"], "_total", reason="unsupported_media_type") == 1
    assert sample(found["zutis_request_duration_seconds"], "_count") == 3  # every /segment answer is timed
    assert sample(found["zutis_queue_wait_seconds"], "_count") == 2
    assert sample(found["zutis_instances_per_image"], "_count") == 2
    # one forward pass per request; a 20 x 30 image letterboxed into 64 x 64 is 43 x 64 there: the rest pads
    padding = found["zutis_batch_padding_ratio"]
    assert sample(padding, "_count") == 2
    assert abs(sample(padding, "_sum") - 2 * (1 - 43 * 64 / 64**2)) < 1e-9
    cache = found["zutis_text_embedding_cache"]  # background, cat, dog, then background and dog again + horse
    assert (sample(cache, "_total", outcome="miss"), sample(cache, "_total", outcome="hit")) == (4, 2)
    assert sample(found["zutis_ready"]) == 1 and sample(found["zutis_queue_depth"]) == 0
    [info] = found["zutis_build_info"].samples
    assert info.value == 1 and info.labels["model"].startswith("tiny-test@")
    default = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")  # bfloat16 where native
    assert (info.labels["device"], info.labels["dtype"]) == ("cpu", default) and info.labels["version"]


def test_each_app_has_its_own_registry():
    first, second = Metrics(), Metrics()
    first.count_rejection("queue_full")
    assert re.search(r'^zutis_requests_rejected_total\{reason="queue_full"\} 1\.0$', first.render().decode(), re.M)
    assert re.search(r'^zutis_requests_rejected_total\{reason="queue_full"\} 0\.0$', second.render().decode(), re.M)
