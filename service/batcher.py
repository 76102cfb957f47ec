"""Batching: the queue of prepared images and the one thread that owns the model and the device.

The model thread loads and warms up the model (the engine's ``load`` and ``warm_up``), then serves: it takes up to
``max_batch_size`` jobs, waiting at most ``max_batch_delay_s`` for more once the first has arrived, drops those
whose client gave up or whose deadline passed, and runs one forward pass. The pass is vocabulary-free, so jobs
with different concept lists share it; each job's own vocabulary head, post-processing and JSON encoding then run
in the worker pool (the engine's ``finish``) while this thread already runs the next pass.

In native geometry images of different sizes share a pass padded to the longest token sequence. Waiting jobs are
grouped by size (``choose_batch``): the oldest job goes first, with the waiting jobs closest to its size as long
as the batch's padded fraction stays within ``max_padding``; the others wait for the next pass. Letterboxed jobs
all have one size, so their batches are plain first-come, first-served.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from model.answer import AnswerFormat
from model.config import InferenceParams
from model.network import ZUTISOutput
from model.predictor import PreparedImage, Predictor
from service.errors import ServiceError
from service.metrics import Metrics
from service.pool import WorkerPool

# The engine's pieces log under the engine's name, as one component.
log = logging.getLogger("service.engine")


@dataclass
class Job:
    """One image on its way through the engine; ``future`` receives its answer or a ``ServiceError``.

    The request (``service.request.SegmentRequest``), resolved: ``vocabulary`` (background first) and its
    ``(C, E)`` unit-norm ``text_embeddings``, the checkpoint's ``params`` with the request's overrides, and the
    ``answer`` format. ``arrived`` and
    ``deadline`` are ``time.perf_counter()`` seconds.
    """

    prepared: PreparedImage
    vocabulary: list[str]
    text_embeddings: torch.Tensor
    params: InferenceParams
    arrived: float
    deadline: float
    answer: AnswerFormat = AnswerFormat()
    future: Future = field(default_factory=Future)
    enqueued: float = 0.0
    length: int = 0  # encoder tokens of the prepared image (set on submit), for grouping by size


@dataclass(frozen=True)
class ForwardPass:
    """One batched forward pass as its jobs' finishing step sees it: image ``i`` of the batch is at index ``i`` of
    ``output``; ``started`` is ``time.perf_counter()`` seconds, ``size`` the images in the pass."""

    predictor: Predictor
    output: ZUTISOutput
    started: float
    duration_s: float
    size: int


# finish(forward_pass, index, job), run in a pool thread: must settle job.future.
FinishFn = Callable[[ForwardPass, int, Job], None]


class Batcher:
    """The queue and the model thread (see the module docstring). ``submit`` is thread-safe and never blocks."""

    def __init__(self, max_batch_size: int, max_batch_delay_s: float, max_padding: float, pool: WorkerPool,
                 metrics: Metrics, finish: FinishFn) -> None:
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.max_padding = max_padding
        self._pool = pool
        self._metrics = metrics
        self._finish = finish
        self._queue: queue.Queue[Job | None] = queue.Queue()  # bounded by admission, not by maxsize
        self._predictor: Predictor | None = None
        self._thread: threading.Thread | None = None

    def start(self, load: Callable[[], Predictor], warm_up: Callable[[Predictor], None],
              on_failure: Callable[[BaseException], None]) -> None:
        """Start the model thread: ``load()``, ``warm_up(predictor)``, then serve; ``on_failure(exc)`` (in that
        thread) instead of serving when either raises. Returns at once."""
        self._thread = threading.Thread(target=self._run, args=(load, warm_up, on_failure), name="zutis-engine",
                                        daemon=True)
        self._thread.start()

    def queue_depth(self) -> int:
        """Jobs submitted and not yet taken by the model thread."""
        return self._queue.qsize()

    def submit(self, job: Job) -> Future:
        """Queue a prepared job for the model; its future gets the finished answer or an exception.

        Cancelling the future before the job's forward pass starts drops the job.
        """
        job.enqueued = time.perf_counter()
        predictor = self._predictor
        job.length = predictor.sequence_length(job.prepared) if predictor is not None else 0
        self._queue.put(job)
        return job.future

    def stop(self, join_timeout_s: float | None) -> None:
        """End the model thread once the queue is empty; wait for it at most ``join_timeout_s`` (None: not at all,
        e.g. while it is still loading: it is a daemon thread)."""
        self._queue.put(None)
        if join_timeout_s is not None and self._thread is not None:
            self._thread.join(join_timeout_s)

    # -- the model thread ------------------------------------------------------------------------------------
    def _run(self, load: Callable[[], Predictor], warm_up: Callable[[Predictor], None],
             on_failure: Callable[[BaseException], None]) -> None:
        try:
            predictor = load()
            self._predictor = predictor
            warm_up(predictor)
        except BaseException as exc:  # noqa: BLE001 - reported by on_failure (/healthz, the process's exit status)
            on_failure(exc)
            return
        self._serve(predictor)

    def _serve(self, predictor: Predictor) -> None:
        pending: list[Job] = []  # taken from the queue, not yet run (oldest first); model thread only
        stop = False
        while pending or not stop:
            if not pending:
                first = self._queue.get()
                if first is None:
                    return
                pending.append(first)
                stop = self._collect(pending, self.max_batch_delay_s)
            elif not stop:  # jobs left over from the last pass have waited already: take what has arrived since
                stop = self._collect(pending, 0.0)
            chosen = choose_batch([job.length for job in pending], self.max_batch_size, self.max_padding)
            batch = [pending[i] for i in chosen]
            taken = set(chosen)
            pending = [job for i, job in enumerate(pending) if i not in taken]
            try:
                self._run_batch(predictor, batch)
            except BaseException:  # noqa: BLE001 - the model thread must survive anything one batch does
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
                if len(pending) < self.max_batch_size and remaining > 0:
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
        live = [job for job in batch if _still_wanted(job, now)]
        if not live:
            return
        start = time.perf_counter()
        prepared = [job.prepared for job in live]
        output = predictor.forward(prepared)
        forward = ForwardPass(predictor, output, start, time.perf_counter() - start, len(live))
        self._metrics.batch_size.observe(len(live))
        self._metrics.batch_padding.observe(predictor.padded_fraction(prepared))
        self._metrics.inference_duration.observe(forward.duration_s)
        for index, job in enumerate(live):
            self._metrics.queue_wait.observe(start - job.enqueued)
            self._pool.submit(self._finish, forward, index, job)


def _still_wanted(job: Job, now: float) -> bool:
    """Mark ``job`` running unless its client gave up (cancelled) or its deadline passed (then: a 504)."""
    if not job.future.set_running_or_notify_cancel():
        return False  # the client went away or gave up: never reaches the model
    if now > job.deadline:
        job.future.set_exception(ServiceError("deadline_exceeded", "the request's deadline passed while it waited "
                                              "for the model"))
        return False
    return True


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
