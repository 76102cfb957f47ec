"""The service through the real app (lifespan included) on a tiny random checkpoint, on the CPU."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from model.predictor import Predictor
from service.app import create_app
from service.settings import Settings
from tests.model.conftest import make_tiny_checkpoint

READY_TIMEOUT_S = 60.0


@pytest.fixture(autouse=True)
def _no_zutis_environment(monkeypatch):
    """Settings read ZUTIS_* from the environment: the tests must not see the caller's. ``ZUTIS_CACHE_DIR`` stays:
    ``tests/conftest.py`` points it at a temporary folder, where every service's OpenVINO exports go."""
    for key in [k for k in os.environ if k.startswith("ZUTIS_") and k != "ZUTIS_CACHE_DIR"]:
        monkeypatch.delenv(key)


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    # The CPU is shared with other processes; two OpenMP threads on a busy 2-core machine make a tiny forward
    # pass 10-100x slower and erratic. Restored after this package's tests.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def service_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("service") / "tiny.safetensors")


def png_bytes(height: int, width: int, seed: int = 0, mode: str = "RGB") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def wait_until_ready(client: TestClient, timeout_s: float = READY_TIMEOUT_S) -> None:
    end = time.monotonic() + timeout_s
    while client.get("/readyz").status_code != 200:
        if time.monotonic() > end:
            raise AssertionError(f"not ready within {timeout_s} s: {client.get('/readyz').json()}")
        time.sleep(0.02)


@pytest.fixture
def make_client(service_checkpoint) -> Iterator[Callable[..., Any]]:
    """``make_client(**settings)`` -> a started, ready ``TestClient`` (closed, i.e. drained, at the test's end)."""
    stack = []

    @contextmanager
    def started(wait: bool = True, loader=None, **overrides: Any) -> Iterator[TestClient]:
        settings = Settings(**{"checkpoint": service_checkpoint, "device": "cpu", "max_batch_size": 4, **overrides})
        with TestClient(create_app(settings, loader=loader)) as client:
            if wait:
                wait_until_ready(client)
            yield client

    def make(**kwargs: Any) -> TestClient:
        context = started(**kwargs)
        client = context.__enter__()
        stack.append(context)
        return client

    yield make
    while stack:
        stack.pop().__exit__(None, None, None)


def segment(client: TestClient, image: bytes, concepts: str | list[str], **fields: Any):
    data: dict[str, Any] = {"concepts": concepts, **{k: str(v) for k, v in fields.items()}}
    return client.post("/segment", files={"image": ("image.png", image, "image/png")}, data=data)


def segment_together(client: TestClient, requests: list[tuple[bytes, str | list[str]]], **fields: Any) -> list:
    """``(image, concepts)`` requests sent at once, one thread each, so that the service may batch them; the
    responses in request order."""
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda item: segment(client, item[0], item[1], **fields), requests))


class InstrumentedPredictor(Predictor):
    """A real predictor that records its forward batch sizes, can hold warm-up at a gate and slow forward down."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch_sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.delay_s = 0.0

    def forward(self, batch):
        self.batch_sizes.append(len(batch))
        self.gate.wait(READY_TIMEOUT_S)
        if self.delay_s:
            time.sleep(self.delay_s)
        return super().forward(batch)


@pytest.fixture
def instrumented(service_checkpoint):
    """``(predictor, loader)``: a loader for ``make_client(loader=...)`` that returns ``predictor``."""
    predictor = InstrumentedPredictor.from_checkpoint(service_checkpoint, "cpu")
    return predictor, lambda: predictor
