"""The batching engine: one thread owns the model and the device.

Requests are admitted against a bound (``queue_size`` requests held at once: decoding, waiting, in a forward pass or
post-processing), prepared in a thread pool (decode, letterbox, cached text embeddings), then queued. The engine
thread takes up to ``max_batch_size`` jobs, waiting at most ``max_batch_delay_ms`` for more once the first has
arrived, drops those whose client gave up or whose deadline passed, and runs one forward pass. The forward pass is
vocabulary-free, so jobs with different concept lists share it; each job's own vocabulary head, post-processing
and JSON encoding then run in the pool while the engine thread already runs the next forward pass.

In native geometry images of different sizes share a pass padded to the longest token sequence. Waiting jobs are
grouped by size (``choose_batch``): the oldest job goes first, with the waiting jobs closest to its size as long
as the batch's padded fraction stays within ``max_batch_padding``; the others wait for the next pass. Letterboxed
jobs all have one size, so their batches are plain first-come, first-served.

Lifecycle: ``loading`` -> ``warming`` (a forward pass at every batch size 1..max_batch_size) -> ``ready``, each step
logged with its duration; ``withdraw()`` makes it ``draining`` for probes (not ready) while requests are still
admitted (the grace period of a shutdown); ``begin_drain()`` also stops admitting; ``stop()`` waits for every
admitted request, then ends the thread. A failure while loading makes it ``failed``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterator

import numpy as np
import torch

from model.config import InferenceParams
from model.embedding_cache import TextEmbeddingCache
from model.network import ZUTISOutput
from model.predictor import PreparedImage, Predictor
from service.schema import SemanticFormat, Timings, build_response
from service.errors import ServiceError
from service.metrics import Metrics

log = logging.getLogger("service.engine")

WARMUP_CONCEPTS = ("warm-up",)


class EngineState(str, Enum):
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


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


@dataclass
class Job:
    """One image on its way through the engine; ``future`` receives its ``Answer`` or a ``ServiceError``.

    ``arrived`` and ``deadline`` are ``time.perf_counter()`` seconds.
    """

    prepared: PreparedImage
    vocabulary: list[str]
    text_embeddings: torch.Tensor
    params: InferenceParams
    semantic: SemanticFormat
    arrived: float
    deadline: float
    future: Future = field(default_factory=Future)
    enqueued: float = 0.0
    length: int = 0  # encoder tokens of the prepared image (set by the engine), for grouping by size


@dataclass(frozen=True)
class Answer:
    """A finished job: the ``SegmentResponse`` JSON (UTF-8 bytes) and what the headers and metrics need."""

    body: bytes
    timings: Timings
    batch_size: int
    num_instances: int


class Engine:
    """Owner of one ``Predictor``; see the module docstring. Thread-safe; the public methods never block long."""

    def __init__(self, loader: Callable[[], Predictor], config: EngineConfig, metrics: Metrics,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.config = config
        self._loader = loader
        self._metrics = metrics
        self._on_fatal = on_fatal
        self._queue: queue.Queue[Job | None] = queue.Queue()  # bounded by admissions, not by maxsize
        self._pool = ThreadPoolExecutor(config.workers, thread_name_prefix="zutis-pool",
                                        initializer=self._init_thread)
        self._thread = threading.Thread(target=self._run, name="zutis-engine", daemon=True)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._admitted = 0
        self._state = EngineState.LOADING
        # Plain flags: withdraw() and begin_drain() run inside signal handlers, where no lock is safe.
        self._withdrawn = False  # readiness off
        self._draining = False  # readiness off and nothing new admitted
        self.cache = TextEmbeddingCache(config.text_cache_size, on_lookup=metrics.count_cache_lookup)
        self.predictor: Predictor | None = None
        self.error: BaseException | None = None
        self.warmup_batch_sizes: list[int] = []
        metrics.watch(queue_depth=self._queue.qsize, inflight=lambda: self._admitted,
                      ready=lambda: float(self.ready))

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Load and warm up in the engine thread, then serve; returns at once."""
        self._thread.start()

    @property
    def state(self) -> EngineState:
        serving = (EngineState.LOADING, EngineState.WARMING, EngineState.READY)
        if (self._draining or self._withdrawn) and self._state in serving:
            return EngineState.DRAINING
        return self._state

    @property
    def ready(self) -> bool:
        return self.state is EngineState.READY

    @property
    def admitted(self) -> int:
        return self._admitted

    @property
    def warm(self) -> bool:
        """Whether the model is loaded and warmed up, whatever the drain state."""
        return self._state is EngineState.READY

    @property
    def refusing(self) -> bool:
        """Whether new requests are refused as ``draining`` (``begin_drain()`` was called)."""
        return self._draining

    def withdraw(self) -> None:
        """Readiness off (``/readyz`` 503) while requests are still admitted. Safe in a signal handler."""
        self._withdrawn = True

    def begin_drain(self) -> None:
        """Readiness off, nothing new admitted; what was admitted is still answered. Safe in a signal handler."""
        self._withdrawn = True
        self._draining = True

    def stop(self, timeout_s: float) -> None:
        """Drain: wait (at most ``timeout_s``) until every admitted request is answered, then end the thread."""
        self.begin_drain()
        end = time.monotonic() + timeout_s
        with self._idle:
            if not self._idle.wait_for(lambda: self._admitted == 0, timeout_s):
                log.warning("drain timed out with %d request(s) unanswered", self._admitted)
        self._queue.put(None)
        if self._state is EngineState.READY:  # still loading or warming up: the daemon thread is not waited for
            self._thread.join(max(0.0, end - time.monotonic()))
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._state is not EngineState.FAILED:
            self._state = EngineState.STOPPED

    # -- admission (event loop side) -------------------------------------------------------------------------
    @contextmanager
    def admission(self) -> Iterator[None]:
        """Hold one of the ``queue_size`` request slots for the duration of the block.

        Raises ``ServiceError`` (503 + Retry-After) at once when not ready, draining or full.
        """
        retry = {"Retry-After": str(self.config.retry_after_s)}
        with self._lock:
            if self._draining:  # and close the connection: the client's next request goes to another replica
                raise ServiceError("draining", "the service is shutting down; retry on another replica",
                                   {**retry, "Connection": "close"})
            if self._state is not EngineState.READY:
                raise ServiceError("not_ready", f"the model is not ready yet ({self.state.value})", retry)
            if self._admitted >= self.config.queue_size:
                raise ServiceError("queue_full", f"the service is at capacity ({self.config.queue_size} requests "
                                   "queued or running); retry shortly", retry)
            self._admitted += 1
        try:
            yield
        finally:
            with self._lock:
                self._admitted -= 1
                if self._admitted == 0:
                    self._idle.notify_all()

    async def run_in_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run CPU work (decode, letterbox, text encoding) in the engine's thread pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def submit(self, job: Job) -> Future:
        """Queue a prepared job for the model; its future gets an ``Answer`` or an exception.

        Cancelling the future before the job's forward pass starts drops the job.
        """
        job.enqueued = time.perf_counter()
        predictor = self.predictor
        job.length = predictor.sequence_length(job.prepared) if predictor is not None else 0
        self._queue.put(job)
        return job.future

    # -- engine thread ---------------------------------------------------------------------------------------
    def _init_thread(self) -> None:
        if self.config.flush_denormal:
            torch.set_flush_denormal(True)  # per thread (the CPU's FTZ/DAZ flags)

    def _run(self) -> None:
        self._init_thread()
        try:
            if self.config.torch_threads is not None:
                torch.set_num_threads(self.config.torch_threads)
            log.info("loading the model")
            start = time.perf_counter()
            predictor = self._loader()
            self.predictor = predictor
            loaded = time.perf_counter()
            log.info("loaded %s on %s (%s) in %.1f s; warming up at batch sizes 1..%d", predictor.model_id,
                     predictor.device, str(predictor.dtype).removeprefix("torch."), loaded - start,
                     self.config.max_batch_size)
            self._state = EngineState.WARMING
            self._warm_up(predictor)
            self._state = EngineState.READY
            log.info("ready: %s on %s, batches up to %d (load %.1f s, warm-up %.1f s)", predictor.model_id,
                     predictor.device, self.config.max_batch_size, loaded - start, time.perf_counter() - loaded)
        except BaseException as exc:  # noqa: BLE001 - reported through /healthz and on_fatal
            log.exception("the model failed to load or warm up")
            self.error = exc
            self._state = EngineState.FAILED
            if self._on_fatal is not None:
                self._on_fatal(exc)
            return
        self._serve(predictor)

    def _warm_up(self, predictor: Predictor) -> None:
        """One forward pass at every batch size that will be used, and the rest of the path once."""
        size = predictor.input_size
        pixels = np.random.default_rng(0).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        prepared = predictor.prepare(pixels)
        vocabulary, text = predictor.encode_concepts(list(WARMUP_CONCEPTS))
        for batch_size in range(1, self.config.max_batch_size + 1):
            start = time.perf_counter()
            output = predictor.forward([prepared] * batch_size)
            self.warmup_batch_sizes.append(batch_size)
            log.info("warm-up: batch size %d/%d in %.2f s", batch_size, self.config.max_batch_size,
                     time.perf_counter() - start)
        prediction = predictor.postprocess(output, 0, prepared, vocabulary, text, predictor.params())
        build_response(prediction, predictor.model_id, "png").model_dump_json()

    def _serve(self, predictor: Predictor) -> None:
        pending: list[Job] = []  # taken from the queue, not yet run (oldest first); engine thread only
        stop = False
        while pending or not stop:
            if not pending:
                first = self._queue.get()
                if first is None:
                    return
                pending.append(first)
                stop = self._collect(pending, self.config.max_batch_delay_s)
            elif not stop:  # jobs left over from the last pass have waited already: take what has arrived since
                stop = self._collect(pending, 0.0)
            chosen = choose_batch([job.length for job in pending], self.config.max_batch_size,
                                  self.config.max_batch_padding)
            batch = [pending[i] for i in chosen]
            taken = set(chosen)
            pending = [job for i, job in enumerate(pending) if i not in taken]
            try:
                self._run_batch(predictor, batch)
            except BaseException:  # noqa: BLE001 - the engine thread must survive anything one batch does
                log.exception("batch failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(ServiceError("internal_error", "inference failed"))

    def _collect(self, pending: list[Job], delay_s: float) -> bool:
        """Add to ``pending`` what arrives within ``delay_s`` until it holds a full batch, then whatever else is
        already queued (so that it can be grouped by size); returns whether the stop sentinel was seen."""
        until = time.perf_counter() + delay_s
        while True:
            remaining = until - time.perf_counter()
            try:
                if len(pending) < self.config.max_batch_size and remaining > 0:
                    job = self._queue.get(timeout=remaining)
                else:
                    job = self._queue.get_nowait()
            except queue.Empty:
                return False
            if job is None:
                return True
            pending.append(job)

    def _run_batch(self, predictor: Predictor, batch: list[Job]) -> None:
        now = time.perf_counter()
        live = []
        for job in batch:
            if not job.future.set_running_or_notify_cancel():
                continue  # the client went away or gave up: never reaches the model
            if now > job.deadline:
                job.future.set_exception(ServiceError("deadline_exceeded", "the request's deadline passed while "
                                                      "it waited for the model"))
                continue
            live.append(job)
        if not live:
            return
        start = time.perf_counter()
        prepared = [job.prepared for job in live]
        output = predictor.forward(prepared)
        forward_s = time.perf_counter() - start
        self._metrics.batch_size.observe(len(live))
        self._metrics.batch_padding.observe(predictor.padded_fraction(prepared))
        self._metrics.inference_duration.observe(forward_s)
        for index, job in enumerate(live):
            self._metrics.queue_wait.observe(start - job.enqueued)
            self._pool.submit(self._finish, predictor, output, index, job, start, forward_s, len(live))

    def _finish(self, predictor: Predictor, output: ZUTISOutput, index: int, job: Job, forward_start: float,
                forward_s: float, batch_size: int) -> None:
        """Pool thread: this job's vocabulary head and post-processing, then its JSON."""
        try:
            begin = time.perf_counter()
            prediction = predictor.postprocess(output, index, job.prepared, job.vocabulary, job.text_embeddings,
                                               job.params, semantic=job.semantic != "none")
            done = time.perf_counter()
            timings = Timings(queue_ms=_ms(forward_start - job.enqueued), inference_ms=_ms(forward_s + done - begin),
                              total_ms=_ms(done - job.arrived))
            body = build_response(prediction, predictor.model_id, job.semantic, timings).model_dump_json()
            self._metrics.instances_per_image.observe(len(prediction.instances))
            job.future.set_result(Answer(body.encode(), timings, batch_size, len(prediction.instances)))
        except BaseException as exc:  # noqa: BLE001 - delivered to the request
            log.exception("post-processing failed")
            job.future.set_exception(exc)


def choose_batch(lengths: list[int], max_batch_size: int, max_padding: float) -> list[int]:
    """The next batch from waiting jobs of the given sequence lengths (oldest first): indices, ascending.

    The oldest job always goes (nothing waits forever); the other jobs join in order of how close their length
    is to its length (ties: the older first) while the batch's padded fraction, ``1 - sum(n) / (B * max(n))``,
    stays at most ``max_padding``, up to ``max_batch_size`` jobs. Equal lengths (letterbox) give plain
    first-come, first-served batches.
    """
    if not lengths:
        return []
    first = lengths[0]
    chosen = [0]
    total, longest = first, first
    for j in sorted(range(1, len(lengths)), key=lambda k: (abs(lengths[k] - first), k)):
        if len(chosen) >= max_batch_size:
            break
        new_longest = max(longest, lengths[j])
        if 1.0 - (total + lengths[j]) / ((len(chosen) + 1) * new_longest) <= max_padding + 1e-12:
            chosen.append(j)
            total, longest = total + lengths[j], new_longest
    return sorted(chosen)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)
