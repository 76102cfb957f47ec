"""Native geometry in the service: images of different sizes share forward passes (grouped by size, the padding
reported) and answer exactly as they do alone."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from model.answer import AnswerFormat
from service.batcher import Job, choose_batch
from service.engine import Engine, EngineConfig
from service.metrics import Metrics
from service.settings import Settings
from tests.service.conftest import InstrumentedPredictor, png_bytes, segment, segment_together
from tests.service.test_segment import MASK_THRESHOLD, metric_value, without_timings

# (H, W) below the tiny checkpoint's cap of 64, most of them not multiples of its patch size 8
SIZES = [(37, 53), (64, 48), (20, 30), (50, 64), (64, 64), (23, 61), (44, 17), (33, 33)]


class RecordingPredictor(InstrumentedPredictor):
    """Also records the (H, W) of every image of every forward pass."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[list[tuple[int, int]]] = []

    def forward(self, batch):
        self.batches.append([p.placement.image_hw for p in batch])
        return super().forward(batch)


def test_native_concurrent_requests_of_different_sizes_answer_as_alone(make_client):
    client = make_client(geometry="native", max_batch_size=8, max_batch_delay_ms=300, max_batch_padding=1.0)
    info = client.get("/info").json()
    assert (info["geometry"], info["input_size"], info["batching"]["max_batch_padding"]) == ("native", 64, 1.0)
    requests = [(png_bytes(h, w, seed=i), ["cat,dog", "red circle, blue star", "a,b,c"][i % 3])
                for i, (h, w) in enumerate(SIZES)]

    together = segment_together(client, requests, mask_threshold=MASK_THRESHOLD)
    assert [r.status_code for r in together] == [200] * len(requests)
    assert max(int(r.headers["x-batch-size"]) for r in together) > 1
    metrics = client.get("/metrics").text
    # different sizes shared a pass: only then does a native batch carry padding
    assert metric_value(metrics, "zutis_batch_padding_ratio_sum") > 0
    assert metric_value(metrics, "zutis_batch_padding_ratio_count") == metric_value(metrics, "zutis_batch_size_count")

    alone = [segment(client, image, concepts, mask_threshold=MASK_THRESHOLD) for image, concepts in requests]
    assert all(int(r.headers["x-batch-size"]) == 1 for r in alone)
    for (h, w), t, a in zip(SIZES, together, alone):
        assert t.json()["image"] == {"width": w, "height": h}
        assert without_timings(t.json()) == without_timings(a.json())
    assert sum(len(r.json()["instances"]) for r in alone) > 0, "no instances: the comparison would miss the masks"


def test_info_reports_the_checkpoint_geometry_by_default(make_client):
    client = make_client()
    assert client.get("/info").json()["geometry"] == "letterbox"  # the tiny checkpoint has no geometry field


def test_native_image_smaller_than_a_patch_is_a_400(make_client):
    client = make_client(geometry="native")
    answer = segment(client, png_bytes(5, 40), "cat")
    assert answer.status_code == 400 and answer.json()["type"] == "invalid_image"
    assert "one patch" in answer.json()["error"]


def test_waiting_images_are_grouped_by_size(service_checkpoint):
    predictor = RecordingPredictor.from_checkpoint(service_checkpoint, "cpu", geometry="native")
    engine = Engine(lambda: predictor, EngineConfig(max_batch_size=4, max_batch_delay_s=0.0,
                                                    max_batch_padding=0.25), Metrics())
    engine.start()
    deadline = time.monotonic() + 60
    while not engine.ready:
        assert time.monotonic() < deadline, engine.state
        time.sleep(0.01)
    try:
        vocabulary, text = predictor.encode_concepts(["cat"], engine.text_cache)

        def job(hw: tuple[int, int]) -> Job:
            pixels = np.random.default_rng(hw[0]).integers(0, 256, size=(*hw, 3), dtype=np.uint8)
            now = time.perf_counter()
            return Job(prepared=predictor.prepare(pixels), vocabulary=vocabulary, text_embeddings=text,
                       params=predictor.params(), answer=AnswerFormat(semantic="none"), arrived=now, deadline=now + 60)

        predictor.gate.clear()  # hold the engine in a forward pass while the others queue up
        blocker = job((16, 16))
        engine.batcher.submit(blocker)
        while not predictor.batches or predictor.batches[-1] != [(16, 16)]:
            time.sleep(0.005)
        sizes = [(64, 64), (16, 16), (64, 64), (16, 24), (64, 56), (64, 64)]
        jobs = [job(hw) for hw in sizes]
        for j in jobs:
            engine.batcher.submit(j)
        predictor.gate.set()
        for j in [blocker, *jobs]:
            j.future.result(30)
        # 65, 5, 65, 7, 57, 65 tokens: the oldest (65) with the three closest (padding 3 %), then the small ones
        assert predictor.batches[-2:] == [[(64, 64), (64, 64), (64, 56), (64, 64)], [(16, 16), (16, 24)]]
    finally:
        predictor.gate.set()
        engine.stop(10)


def test_choose_batch() -> None:
    assert choose_batch([], 4, 0.25) == []
    assert choose_batch([10] * 6, 4, 0.0) == [0, 1, 2, 3]  # equal sizes (letterbox): first come, first served
    assert choose_batch([100, 10, 90, 95, 12], 8, 0.1) == [0, 2, 3]
    assert choose_batch([10, 100, 12, 11], 8, 0.25) == [0, 2, 3]
    assert choose_batch([10, 100], 8, 1.0) == [0, 1]  # no grouping: everything shares
    assert choose_batch([10, 100, 100], 8, 0.25) == [0]  # the oldest goes, even alone


def test_postprocess_workers_follow_the_cores():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert Settings().workers() == cores
    assert Settings(postprocess_workers=3).workers() == 3


@pytest.mark.parametrize("value", ["square", ""])
def test_geometry_setting_is_checked(monkeypatch, value):
    monkeypatch.setenv("ZUTIS_GEOMETRY", value)
    if value:
        with pytest.raises(ValueError, match="geometry"):
            Settings()
    else:
        assert Settings().geometry is None  # empty = unset: the checkpoint's
    monkeypatch.setenv("ZUTIS_GEOMETRY", "native")
    assert Settings().geometry == "native"
