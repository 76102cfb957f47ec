"""The batching engine on its own: one forward pass for different vocabularies, and jobs given up on are dropped."""

from __future__ import annotations

import asyncio
import json
import time
from functools import partial

import numpy as np
import pytest

from model.answer import AnswerFormat
from service.schema import build_response
from service.batcher import Job
from service.engine import Engine, EngineConfig, await_answer
from service.errors import ServiceError
from service.metrics import Metrics
from service.routes.segment import client_gone
from tests.service.conftest import InstrumentedPredictor

MASK_THRESHOLD = 0.46


@pytest.fixture
def engine_and_predictor(service_checkpoint):
    predictor = InstrumentedPredictor.from_checkpoint(service_checkpoint, "cpu")
    engine = Engine(lambda: predictor, EngineConfig(max_batch_size=4, max_batch_delay_s=0.5), Metrics())
    engine.start()
    deadline = time.monotonic() + 60
    while not engine.ready:
        assert time.monotonic() < deadline, engine.state
        time.sleep(0.01)
    yield engine, predictor
    predictor.gate.set()
    engine.stop(10)


def image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(20 + 3 * seed, 40 - 2 * seed, 3), dtype=np.uint8)


def make_job(engine: Engine, predictor, seed: int, concepts: list[str]) -> Job:
    vocabulary, text = predictor.encode_concepts(concepts, engine.text_cache)
    now = time.perf_counter()
    return Job(prepared=predictor.prepare(image(seed)), vocabulary=vocabulary, text_embeddings=text,
               params=predictor.params(mask_threshold=MASK_THRESHOLD), answer=AnswerFormat(semantic="png"),
               arrived=now, deadline=now + 60)


def hold_engine(engine: Engine, predictor) -> Job:
    """Queue a job and wait until the engine thread is stuck in its forward pass (at the closed gate)."""
    predictor.gate.clear()
    before = len(predictor.batch_sizes)
    blocker = make_job(engine, predictor, 0, ["cat"])
    engine.batcher.submit(blocker)
    while len(predictor.batch_sizes) == before:
        time.sleep(0.005)
    return blocker


def test_different_vocabularies_share_one_forward_pass(engine_and_predictor):
    engine, predictor = engine_and_predictor
    vocabularies = [["cat", "dog"], ["a", "b", "c", "d", "e", "f"], ["red circle"], ["dog", "horse", "cow"]]
    blocker = hold_engine(engine, predictor)
    jobs = [make_job(engine, predictor, seed, concepts) for seed, concepts in enumerate(vocabularies, start=1)]
    for job in jobs:
        engine.batcher.submit(job)
    predictor.gate.set()
    answers = [job.future.result(30) for job in jobs]
    blocker.future.result(30)
    assert predictor.batch_sizes[-2:] == [1, 4]  # the blocker alone, then all four together
    assert {answer.batch_size for answer in answers} == {4}
    for seed, (job, answer) in enumerate(zip(jobs, answers), start=1):
        body = json.loads(answer.body)
        assert body["concepts"] == job.vocabulary
        # Alone, through the predictor's own one-image path with the same embeddings: the same answer.
        out = predictor.forward([job.prepared])
        alone = predictor.postprocess(out, 0, job.prepared, job.vocabulary, job.text_embeddings, job.params)
        expected = json.loads(build_response(alone, predictor.model_id, "png").model_dump_json())
        body.pop("timings"), expected.pop("timings")
        assert body == expected


def test_cancelled_job_never_reaches_the_model(engine_and_predictor):
    engine, predictor = engine_and_predictor
    blocker = hold_engine(engine, predictor)
    gone, kept = make_job(engine, predictor, 1, ["cat"]), make_job(engine, predictor, 2, ["dog"])
    engine.batcher.submit(gone)
    engine.batcher.submit(kept)
    assert gone.future.cancel()
    predictor.gate.set()
    assert json.loads(kept.future.result(30).body)["concepts"] == ["background", "dog"]
    blocker.future.result(30)
    assert predictor.batch_sizes[-2:] == [1, 1]  # the blocker, then `kept` alone


def test_expired_job_gets_504_without_reaching_the_model(engine_and_predictor):
    engine, predictor = engine_and_predictor
    blocker = hold_engine(engine, predictor)
    late = make_job(engine, predictor, 1, ["cat"])
    late.deadline = time.perf_counter() + 0.05
    engine.batcher.submit(late)
    time.sleep(0.1)
    predictor.gate.set()
    with pytest.raises(ServiceError) as error:
        late.future.result(30)
    assert error.value.type == "deadline_exceeded" and error.value.status_code == 504
    blocker.future.result(30)
    time.sleep(0.6)  # past the batching delay: nothing else ran
    assert predictor.batch_sizes[-1:] == [1] and len(predictor.batch_sizes) == 5  # 4 warm-up + the blocker


def test_client_disconnect_cancels_the_job(engine_and_predictor):
    engine, predictor = engine_and_predictor

    class GoneClient:
        async def receive(self):
            return {"type": "http.disconnect"}

    blocker = hold_engine(engine, predictor)
    job = make_job(engine, predictor, 1, ["cat"])
    with pytest.raises(ServiceError) as error:
        asyncio.run(await_answer(engine.batcher, job, 30.0, partial(client_gone, GoneClient())))
    assert error.value.type == "client_disconnected"
    assert job.future.cancelled()
    predictor.gate.set()
    blocker.future.result(30)
    time.sleep(0.6)
    assert len(predictor.batch_sizes) == 5  # 4 warm-up + the blocker
