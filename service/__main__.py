"""``python -m service``: one uvicorn worker (one process per GPU; scale with processes or replicas).

Configuration comes from ``ZUTIS_*`` environment variables (service.settings); a bad value ends the process with
one line naming the variable and the rule, and status 2 (as a missing checkpoint does). HTTP/1.1 is served by
httptools with limits on the request head's size and on the time a client may take to send a request, and a cap
on open connections (``ZUTIS_MAX_HEADER_BYTES``, ``ZUTIS_HEAD_TIMEOUT_S``, ``ZUTIS_BODY_IDLE_TIMEOUT_S``,
``ZUTIS_BODY_TIMEOUT_S``, ``ZUTIS_MAX_CONNECTIONS``; service.protocol). On SIGTERM (or Ctrl-C)
the service drains as load balancers expect (service.server): it keeps listening, ``/readyz`` answers 503, new
``/segment`` requests get 503 + ``Retry-After`` after the optional grace period, accepted ones are answered, and
the process exits 0 within ``ZUTIS_DRAIN_TIMEOUT_S``. It exits 1 when the model fails to load.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from pydantic import ValidationError

from service.settings import Settings, describe_settings_error

if TYPE_CHECKING:  # an annotation only: the engine loads torch
    from service.engine import Engine

log = logging.getLogger("service")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as error:
        logging.basicConfig(level="INFO", format=LOG_FORMAT)
        log.error("%s", describe_settings_error(error))
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    # Imported once the settings are known to be good: a bad one is reported at once, before torch loads.
    import uvicorn

    from service.app import create_app
    from service.protocol import ConnectionLimits, guarded_protocol
    from service.server import DrainingServer

    failures: list[BaseException] = []
    server: DrainingServer | None = None

    def on_fatal(exc: BaseException) -> None:
        failures.append(exc)
        if server is not None:
            server.should_exit = True

    try:
        app = create_app(settings, on_fatal=on_fatal)
    except (FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2

    def engine() -> Engine | None:
        return getattr(app.state, "engine", None)

    def on_deadline(deadline: float) -> None:
        app.state.shutdown_deadline = deadline

    log.info("serving %s on http://%s:%d", settings.checkpoint, settings.host, settings.port)
    protocol = guarded_protocol(ConnectionLimits.from_settings(settings), app.state.metrics.count_rejection)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, workers=1, lifespan="on", http=protocol,
                            log_level=settings.log_level, timeout_graceful_shutdown=int(settings.drain_timeout_s))
    server = DrainingServer(config, engine, settings.drain_grace_s, settings.drain_timeout_s, on_deadline)
    # uvicorn re-raises the shutdown signal once it has finished; with these handlers that ends in `return`
    # below (exit 0 after a graceful drain) instead of the default action (killed by SIGTERM, status -15).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 1 if failures else 0


def exit_now(status: int) -> None:
    """Flush the logs and streams and end the process with ``status`` at once.

    After a drain everything is answered, closed and flushed; what is left is the interpreter's teardown of torch
    and its allocations, which took 2-3 s on a busy CPU and would overrun a short ``ZUTIS_DRAIN_TIMEOUT_S``.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    exit_now(main())
