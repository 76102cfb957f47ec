"""The engine: what ``POST /segment`` calls, one method (``segment``) from a parsed request to the encoded answer.

It composes three pieces, each in its own module:

- ``service.admission``: the lifecycle state, the drain flags, and the bound of ``queue_size`` requests held at
  once (decoding, waiting, in a forward pass or post-processing);
- ``service.pool``: the CPU threads that decode and prepare each image and fetch its text embeddings (through the
  per-concept cache) before the pass, and run its vocabulary head, post-processing and JSON encoding after it;
- ``service.batcher``: the queue and the one thread that owns the model and the device.

A request is admitted (or refused at once: 503 + Retry-After), prepared in the pool, queued, run in a forward pass
with whatever else waits, finished in the pool, and answered. Its deadline, its client going away, and a drain
that times out while it waits are answered as ``ServiceError``, the service's one error type.

Lifecycle: ``loading`` -> ``warming`` (a forward pass at every batch size 1..max_batch_size) -> ``ready``, each step
logged with its duration; ``withdraw()`` makes it ``draining`` for probes (not ready) while requests are still
admitted (the grace period of a shutdown); ``begin_drain()`` also stops admitting; ``stop()`` waits for every
admitted request, then ends the model thread. A failure while loading makes it ``failed``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from model.config import InferenceParams
from model.download import FetchError
from model.embedding_cache import TextEmbeddingCache
from model.predictor import Predictor
from model.text import with_background
from model.vocabularies import load_vocabulary
from service.admission import Admission, EngineState
from service.batcher import Batcher, ForwardPass, Job
from service.errors import ServiceError
from service.metrics import Metrics
from service.pool import WorkerPool, prepare_torch_thread
from service.request import ImageSource, SegmentRequest
from service.schema import Timings, encode_answer
from service.upload import decode_image

log = logging.getLogger("service.engine")

WARMUP_CONCEPTS = ("warm-up",)


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 8
    max_batch_delay_s: float = 0.005
    queue_size: int = 64
    workers: int = 2
    max_batch_padding: float = 0.25
    text_cache_size: int = 10_000
    retry_after_s: int = 1
    flush_denormal: bool = True
    torch_threads: int | None = None
    max_image_pixels: int = 40_000_000
    exif_orientation: bool = True
    max_instances: int = 100  # the service's cap on instances per answer (a checkpoint's default may be higher)


@dataclass(frozen=True)
class Deadline:
    """A request's time limit: it arrived at ``arrived`` (``time.perf_counter()`` seconds) and has ``timeout_s``."""

    arrived: float
    timeout_s: float

    @property
    def at(self) -> float:
        return self.arrived + self.timeout_s


@dataclass(frozen=True)
class Answer:
    """A finished request: the ``SegmentResponse`` JSON (UTF-8 bytes) and what the headers and metrics need."""

    body: bytes
    timings: Timings
    batch_size: int
    model_id: str


class Engine:
    """Owner of one ``Predictor``; see the module docstring. Thread-safe; the public methods never block long.

    ``batcher`` and ``text_cache`` are there for tests and benchmarks; the service goes through ``segment``.
    """

    def __init__(self, loader: Callable[[], Predictor], config: EngineConfig, metrics: Metrics,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.config = config
        self._loader = loader
        self._metrics = metrics
        self._on_fatal = on_fatal
        self._admission = Admission(config.queue_size, config.retry_after_s)
        self._pool = WorkerPool(config.workers, config.flush_denormal)
        self.batcher = Batcher(config.max_batch_size, config.max_batch_delay_s, config.max_batch_padding,
                               self._pool, metrics, self._finish)
        self.text_cache = TextEmbeddingCache(config.text_cache_size, on_lookup=metrics.count_cache_lookup)
        self._predictor: Predictor | None = None
        self._load_s = 0.0  # how long loading took (for the "ready" log line)
        self.error: BaseException | None = None
        metrics.watch(queue_depth=self.batcher.queue_depth, inflight=lambda: self._admission.held,
                      ready=lambda: float(self.ready))

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Load and warm up in the model thread, then serve; returns at once."""
        self.batcher.start(self._load, self._warm_up, self._fail)

    @property
    def predictor(self) -> Predictor | None:
        """The model, once loaded (also while warming up); None before."""
        return self._predictor

    @property
    def state(self) -> EngineState:
        return self._admission.state

    @property
    def ready(self) -> bool:
        return self.state is EngineState.READY

    @property
    def warm(self) -> bool:
        """Whether the model is loaded and warmed up, whatever the drain state."""
        return self._admission.phase is EngineState.READY

    @property
    def admitted(self) -> int:
        return self._admission.held

    @property
    def refusing(self) -> bool:
        """Whether new requests are refused as ``draining`` (``begin_drain()`` was called)."""
        return self._admission.refusing

    def withdraw(self) -> None:
        """Readiness off (``/readyz`` 503) while requests are still admitted. Safe in a signal handler."""
        self._admission.withdraw()

    def begin_drain(self) -> None:
        """Readiness off, nothing new admitted; what was admitted is still answered. Safe in a signal handler."""
        self._admission.begin_drain()

    def stop(self, timeout_s: float) -> None:
        """Drain: wait (at most ``timeout_s``) until every admitted request is answered, then end the thread."""
        self.begin_drain()
        end = time.monotonic() + timeout_s
        if not self._admission.wait_idle(timeout_s):
            log.warning("drain timed out with %d request(s) unanswered", self._admission.held)
        # Still loading or warming up: the daemon thread is not waited for.
        self.batcher.stop(max(0.0, end - time.monotonic()) if self.warm else None)
        self._pool.shutdown()
        if self._admission.phase is not EngineState.FAILED:
            self._admission.phase = EngineState.STOPPED

    # -- requests (event loop side) --------------------------------------------------------------------------
    async def segment(self, image: ImageSource, request: SegmentRequest, deadline: Deadline,
                      client_gone: Callable[[], Awaitable[None]]) -> Answer:
        """One image segmented as ``request`` asks: its answer, or a ``ServiceError``.

        Args:
            image: where the image's bytes come from (read in the pool: an upload, so that only the requests being
                decoded hold image bytes in memory, waiting ones keep Starlette's spooled file; a JSON body's
                decoded base64; or an allowed URL, fetched there).
            request: the typed request built at the edge (``service.request``): its concepts normalised and
                distinct, or a vocabulary name; threshold overrides (the number of instances is capped at
                ``config.max_instances``); the answer's format.
            deadline: when the request arrived and how long it may take (past it: 504).
            client_gone: returns when the client has disconnected (then: 499, and the job is dropped).
        """
        with self._admission.slot():
            predictor = self._predictor
            assert predictor is not None  # admitted only once the model is loaded and warm
            params = self._params(predictor, request)
            try:
                job = await self._pool.run(self._prepare, predictor, image, request, params, deadline)
                return await await_answer(self.batcher, job, deadline.timeout_s, client_gone)
            except asyncio.CancelledError:
                if not self._admission.refusing:
                    raise
                # uvicorn cancels what is left when the drain timeout passes: answer 503 rather than its plain 500.
                raise ServiceError("draining", "the service shut down before the answer was ready (drain timeout); "
                                   "retry on another replica", {"Retry-After": str(self.config.retry_after_s),
                                                                "Connection": "close"}) from None

    def _params(self, predictor: Predictor, request: SegmentRequest) -> InferenceParams:
        """The checkpoint's defaults with the request's overrides, instances capped at the service's limit."""
        try:
            params = predictor.params(**request.overrides())
        except ValueError as exc:
            raise ServiceError("invalid_request", str(exc)) from None
        if params.max_instances > self.config.max_instances:
            params = params.with_overrides(max_instances=self.config.max_instances)
        return params

    # -- pool threads ----------------------------------------------------------------------------------------
    def _prepare(self, predictor: Predictor, source: ImageSource, request: SegmentRequest, params: InferenceParams,
                 deadline: Deadline) -> Job:
        """Read, decode and prepare the image; the vocabulary's text embeddings (cached, so a named vocabulary
        costs its text encoding once). An image the geometry cannot take (in native geometry, a side shorter than
        one patch) is a 400."""
        image = decode_image(source.read(), self.config.max_image_pixels, self.config.exif_orientation)
        try:
            prepared = predictor.prepare(image)
        except ValueError as exc:
            raise ServiceError("invalid_image", str(exc)) from None
        vocabulary = request_vocabulary(predictor, request)
        text_embeddings = predictor.encode_vocabulary(vocabulary, self.text_cache)
        return Job(prepared=prepared, vocabulary=vocabulary, text_embeddings=text_embeddings, params=params,
                   answer=request.answer_format(), arrived=deadline.arrived, deadline=deadline.at)

    def _finish(self, forward: ForwardPass, index: int, job: Job) -> None:
        """Image ``index`` of a forward pass: its vocabulary head and post-processing, then its JSON."""
        try:
            begin = time.perf_counter()
            prediction = forward.predictor.postprocess(forward.output, index, job.prepared, job.vocabulary,
                                                       job.text_embeddings, job.params,
                                                       semantic=job.answer.semantic != "none")
            done = time.perf_counter()
            timings = Timings(queue_ms=_ms(forward.started - job.enqueued),
                              inference_ms=_ms(forward.duration_s + done - begin), total_ms=_ms(done - job.arrived))
            model_id = forward.predictor.model_id
            body = encode_answer(prediction, model_id, job.answer, timings).model_dump_json()
            self._metrics.instances_per_image.observe(len(prediction.instances))
            job.future.set_result(Answer(body.encode(), timings, forward.size, model_id))
        except BaseException as exc:  # noqa: BLE001 - delivered to the request
            log.exception("post-processing failed")
            job.future.set_exception(exc)

    # -- the model thread ------------------------------------------------------------------------------------
    def _load(self) -> Predictor:
        """Set up the thread and load the model (``loading`` -> ``warming``)."""
        prepare_torch_thread(self.config.flush_denormal)
        if self.config.torch_threads is not None:
            torch.set_num_threads(self.config.torch_threads)
        log.info("loading the model")
        start = time.perf_counter()
        predictor = self._loader()
        self._predictor = predictor
        self._load_s = time.perf_counter() - start
        log.info("loaded %s on %s (%s: %s; runtime %s: %s) in %.1f s; warming up at batch sizes 1..%d",
                 predictor.model_id, predictor.device, str(predictor.dtype).removeprefix("torch."),
                 predictor.dtype_reason, predictor.runtime, predictor.runtime_reason, self._load_s,
                 self._warm_up_batch_sizes(predictor))
        self._admission.phase = EngineState.WARMING
        return predictor

    def _warm_up_batch_sizes(self, predictor: Predictor) -> int:
        """The largest batch size warm-up runs (it runs every size from 1): OpenVINO runs a batch one image at a
        time through one compiled network, so batch size 1 warms it all."""
        return 1 if predictor.runtime == "openvino" else self.config.max_batch_size

    def _warm_up(self, predictor: Predictor) -> None:
        """One forward pass at every batch size that will be used, and the rest of the path once (-> ``ready``)."""
        start = time.perf_counter()
        size = predictor.input_size
        pixels = np.random.default_rng(0).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        prepared = predictor.prepare(pixels)
        vocabulary, text = predictor.encode_concepts(list(WARMUP_CONCEPTS))
        largest = self._warm_up_batch_sizes(predictor)
        for batch_size in range(1, largest + 1):
            begin = time.perf_counter()
            output = predictor.forward([prepared] * batch_size)
            log.info("warm-up: batch size %d/%d in %.2f s", batch_size, largest,
                     time.perf_counter() - begin)
        prediction = predictor.postprocess(output, 0, prepared, vocabulary, text, predictor.params())
        encode_answer(prediction, predictor.model_id).model_dump_json()
        self._admission.phase = EngineState.READY
        log.info("ready: %s on %s, batches up to %d (load %.1f s, warm-up %.1f s)", predictor.model_id,
                 predictor.device, self.config.max_batch_size, self._load_s, time.perf_counter() - start)

    def _fail(self, exc: BaseException) -> None:
        """The model failed to load or warm up: ``failed``, reported through /healthz and ``on_fatal``."""
        if isinstance(exc, FetchError):  # one line naming the URL and what was wrong; a traceback adds nothing
            log.error("could not fetch the model: %s", exc)
        else:
            log.error("the model failed to load or warm up", exc_info=exc)
        self.error = exc
        self._admission.phase = EngineState.FAILED
        if self._on_fatal is not None:
            self._on_fatal(exc)


def request_vocabulary(predictor: Predictor, request: SegmentRequest) -> list[str]:
    """The vocabulary a request names, background first: its concepts, or a named vocabulary (``checkpoint``: the
    one the checkpoint was trained or converted with), its names used as they are."""
    if request.vocabulary is None:
        return with_background(request.concepts or ())
    if request.vocabulary == "checkpoint":
        return list(predictor.metadata.vocabulary)
    return load_vocabulary(request.vocabulary)


async def await_answer(batcher: Batcher, job: Job, timeout_s: float,
                       client_gone: Callable[[], Awaitable[None]]) -> Answer:
    """Queue ``job`` and wait for its answer, its deadline, or the client going away (whichever comes first).

    A job given up on is cancelled: if its forward pass has not started, it never reaches the model.
    ``timeout_s`` is the request's time limit, for the error message.
    """
    if time.perf_counter() > job.deadline:
        raise ServiceError("deadline_exceeded", f"the request's deadline of {timeout_s:g} s passed before it "
                           "could be queued")
    answer = asyncio.wrap_future(batcher.submit(job))
    gone = asyncio.ensure_future(client_gone())
    try:
        done, _ = await asyncio.wait({answer, gone}, timeout=max(0.0, job.deadline - time.perf_counter()),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not answer.done():
            answer.cancel()
    if answer in done:
        return answer.result()
    if gone in done:
        raise ServiceError("client_disconnected", "the client closed the connection before the answer was ready")
    raise ServiceError("deadline_exceeded", f"no answer within the request deadline of {timeout_s:g} s")


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)
