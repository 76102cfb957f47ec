"""Real services for the client's tests: ``python -m service`` on the shipped checkpoint (module-wide), and the
app on a tiny checkpoint served by uvicorn in a thread, whose warm-up can be held (a service that answers 503) or
whose forward pass can be slowed down (a service that answers late)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn

from service.app import create_app
from service.settings import Settings
from tests.live_service import running_service
from tests.service.conftest import (InstrumentedPredictor, _no_zutis_environment, _one_torch_thread,  # noqa: F401
                                    service_checkpoint)  # fixtures (the first two autouse), shared with tests/service
from tests.support import free_port, wait_for


@pytest.fixture(scope="package")
def live_url(tmp_path_factory) -> Iterator[str]:
    """Base URL of ``python -m service`` on weights/zutis-shapes.safetensors (batches of up to 2 images)."""
    with running_service(tmp_path_factory.mktemp("client") / "service.log", max_batch_size="2") as url:
        yield url


@contextmanager
def _serve(settings: Settings, predictor: InstrumentedPredictor) -> Iterator[str]:
    server = uvicorn.Server(uvicorn.Config(create_app(settings, loader=lambda: predictor), host="127.0.0.1",
                                           port=settings.port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, "service up",
                 ignore=(httpx.HTTPError,))
        yield url
    finally:
        predictor.gate.set()
        predictor.delay_s = 0.0
        server.should_exit = True
        thread.join(60)


@pytest.fixture
def serve(service_checkpoint) -> Iterator[Callable[..., tuple[str, InstrumentedPredictor]]]:
    """``serve(ready=True, **settings) -> (url, predictor)``: the app on a tiny checkpoint behind real uvicorn.
    With ``ready=False`` the warm-up is held at the predictor's gate, so /segment answers 503 until
    ``predictor.gate.set()``."""
    stack: list[Any] = []

    def start(ready: bool = True, **overrides: Any) -> tuple[str, InstrumentedPredictor]:
        predictor = InstrumentedPredictor.from_checkpoint(service_checkpoint, "cpu")
        if not ready:
            predictor.gate.clear()
        settings = Settings(**{"checkpoint": service_checkpoint, "device": "cpu", "max_batch_size": 1,
                               "port": free_port(), **overrides})
        context = _serve(settings, predictor)
        url = context.__enter__()
        stack.append(context)
        if ready:
            wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, 60, "service ready",
                     ignore=(httpx.HTTPError,))
        return url, predictor

    yield start
    while stack:
        stack.pop().__exit__(None, None, None)
