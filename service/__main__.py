"""``python -m service``: one uvicorn worker (one process per GPU; scale with processes or replicas).

Configuration comes from ``ZUTIS_*`` environment variables (service.settings). On SIGTERM (or Ctrl-C) readiness
turns false at once and new requests get 503, uvicorn stops accepting connections and waits for the open ones,
the lifespan drains the engine, and the process exits 0. It exits 1 when the model fails to load.
"""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType
from typing import Callable

import uvicorn

from service.app import create_app
from service.settings import Settings


class DrainingServer(uvicorn.Server):
    """uvicorn's server, turning the engine's readiness off as soon as a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_signal = on_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_signal()
        super().handle_exit(sig, frame)


def main() -> int:
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failures: list[BaseException] = []
    server: DrainingServer | None = None

    def on_fatal(exc: BaseException) -> None:
        failures.append(exc)
        if server is not None:
            server.should_exit = True

    try:
        app = create_app(settings, on_fatal=on_fatal)
    except (FileNotFoundError, ValueError) as exc:
        logging.getLogger("service").error("%s", exc)
        return 2

    def begin_drain() -> None:
        engine = getattr(app.state, "engine", None)
        if engine is not None:
            engine.begin_drain()

    config = uvicorn.Config(app, host=settings.host, port=settings.port, workers=1, lifespan="on",
                            log_level=settings.log_level, timeout_graceful_shutdown=int(settings.drain_timeout_s))
    server = DrainingServer(config, begin_drain)
    # uvicorn re-raises the shutdown signal once it has finished; with these handlers that ends in `return`
    # below (exit 0 after a graceful drain) instead of the default action (killed by SIGTERM, status -15).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
