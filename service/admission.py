"""Admission to ``POST /segment``: the engine's lifecycle state, the drain flags, and the bound on requests held.

Lifecycle: ``loading`` -> ``warming`` -> ``ready`` as the engine loads and warms up the model (``phase``), ``failed``
when that fails, ``stopped`` once stopped. ``withdraw()`` makes the reported state ``draining`` (readiness off)
while requests are still admitted (the grace period of a shutdown); ``begin_drain()`` also stops admitting. At most
``limit`` requests are held at once (decoding, waiting for the model, in a forward pass or post-processing); a
refusal is immediate: 503 with ``Retry-After``.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from enum import Enum
from typing import Iterator

from service.errors import ServiceError


class EngineState(str, Enum):
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class Admission:
    """The gate in front of the engine. Thread-safe; ``withdraw`` and ``begin_drain`` are safe in signal handlers.

    ``phase`` is the model's own progress (never ``draining``), set by the engine; ``state`` is what probes report.
    """

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.phase = EngineState.LOADING
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._held = 0
        # Plain flags: withdraw() and begin_drain() run inside signal handlers, where no lock is safe.
        self._withdrawn = False  # readiness off
        self._draining = False  # readiness off and nothing new admitted

    @property
    def state(self) -> EngineState:
        """``phase``, or ``draining`` once withdrawn while loading, warming or ready."""
        serving = (EngineState.LOADING, EngineState.WARMING, EngineState.READY)
        if (self._draining or self._withdrawn) and self.phase in serving:
            return EngineState.DRAINING
        return self.phase

    @property
    def held(self) -> int:
        """Requests admitted and not yet answered."""
        return self._held

    @property
    def refusing(self) -> bool:
        """Whether new requests are refused as ``draining`` (``begin_drain()`` was called)."""
        return self._draining

    def withdraw(self) -> None:
        """Readiness off (``/readyz`` 503) while requests are still admitted."""
        self._withdrawn = True

    def begin_drain(self) -> None:
        """Readiness off, nothing new admitted; what was admitted is still answered."""
        self._withdrawn = True
        self._draining = True

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the ``limit`` request slots for the duration of the block.

        Raises ``ServiceError`` (503 + Retry-After) at once when draining, not ready, or full.
        """
        retry = {"Retry-After": str(self.retry_after_s)}
        with self._lock:
            if self._draining:  # and close the connection: the client's next request goes to another replica
                raise ServiceError("draining", "the service is shutting down; retry on another replica",
                                   {**retry, "Connection": "close"})
            if self.phase is not EngineState.READY:
                raise ServiceError("not_ready", f"the model is not ready yet ({self.state.value})", retry)
            if self._held >= self.limit:
                raise ServiceError("queue_full", f"the service is at capacity ({self.limit} requests queued or "
                                   "running); retry shortly", retry)
            self._held += 1
        try:
            yield
        finally:
            with self._lock:
                self._held -= 1
                if self._held == 0:
                    self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until no request is held; whether none is."""
        with self._idle:
            return self._idle.wait_for(lambda: self._held == 0, timeout_s)
