"""The uvicorn server the service runs in: the bounded-head HTTP protocol and a shutdown that load balancers see.

On the first SIGTERM (or Ctrl-C) the server keeps listening and answering:

1. at once, ``/readyz`` turns 503 ("draining"), so that load balancers and Kubernetes stop sending traffic;
2. for ``drain_grace_s`` (default 0) new ``/segment`` requests are still accepted: Kubernetes removes a pod from
   its Service's endpoints at the same time as it sends SIGTERM, so requests keep arriving for a moment;
3. then new ``/segment`` requests get 503 "draining" with ``Retry-After`` (and ``Connection: close``), while the
   accepted ones are answered;
4. when none is left, or ``drain_timeout_s`` after the signal at the latest, uvicorn's own shutdown runs: the
   listening socket closes, open connections finish, the lifespan stops the engine, and the process exits 0.

A second signal skips what is left of the wait (uvicorn's own behaviour).
"""

from __future__ import annotations

import logging
import time
from types import FrameType
from typing import Callable

import uvicorn

from service.engine import Engine

log = logging.getLogger("service")

TICK_S = 0.1  # uvicorn's main loop checks on_tick every 0.1 s
SHUTDOWN_RESERVE_S = 1.0  # kept from the drain timeout for uvicorn's shutdown and the lifespan


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` with the drain sequence of this module's docstring.

    Args:
        config: uvicorn's configuration.
        engine: returns the app's engine (None before the lifespan has started it).
        drain_grace_s: seconds after the signal during which requests are still admitted.
        drain_timeout_s: the longest time from the signal to the end of the wait for accepted requests plus
            uvicorn's shutdown.
        on_deadline: called with the ``time.monotonic()`` deadline of the shutdown when the drain starts, so that
            the lifespan's engine stop keeps within it.
    """

    def __init__(self, config: uvicorn.Config, engine: Callable[[], Engine | None], drain_grace_s: float,
                 drain_timeout_s: float, on_deadline: Callable[[float], None] | None = None) -> None:
        super().__init__(config)
        self._engine = engine
        self._grace_s = drain_grace_s
        self._timeout_s = drain_timeout_s
        self._on_deadline = on_deadline
        self._signalled_at: float | None = None
        self._refusing = False
        self._announced = False

    @property
    def draining(self) -> bool:
        """Whether a shutdown signal has arrived."""
        return self._signalled_at is not None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signalled_at is not None or self.should_exit:
            super().handle_exit(sig, frame)  # a second signal: shut down now
            return
        # In a signal handler: only flags are set here; on_tick does the rest on the event loop.
        self._signalled_at = time.monotonic()
        engine = self._engine()
        if engine is not None:
            engine.withdraw()

    async def on_tick(self, counter: int) -> bool:
        if self._signalled_at is not None and not self.should_exit:
            self._advance_drain(time.monotonic() - self._signalled_at)
        return await super().on_tick(counter)

    def _advance_drain(self, elapsed: float) -> None:
        engine = self._engine()
        if not self._refusing:
            if not self._announced:
                self._announced = True
                if self._on_deadline is not None:
                    self._on_deadline(time.monotonic() - elapsed + self._timeout_s)
                if engine is not None and engine.warm and self._grace_s > 0:
                    log.info("shutdown signal: readiness off; still accepting requests for %.1f s (grace period)",
                             self._grace_s)
            if engine is not None and engine.warm and elapsed < self._grace_s:
                return
            if engine is not None:
                engine.begin_drain()
            self._refusing = True
            log.info("draining: new requests refused; waiting for %d accepted request(s), at most %.1f s",
                     0 if engine is None else engine.admitted, max(0.0, self._timeout_s - elapsed))
        reserve = min(SHUTDOWN_RESERVE_S, self._timeout_s / 4)
        left = 0 if engine is None else engine.admitted
        if left == 0 or elapsed >= self._timeout_s - reserve:
            if left:
                log.warning("drain timeout: %d request(s) still unanswered", left)
            # uvicorn's wait for open connections gets what is left of the drain timeout.
            timeout = max(TICK_S, self._timeout_s - elapsed - reserve / 2)
            self.config.timeout_graceful_shutdown = timeout  # type: ignore[assignment]  # read as a float
            self.should_exit = True
