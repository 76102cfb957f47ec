"""Schemathesis against the service's own OpenAPI document: POST /segment's two bodies (multipart form and JSON)
as the document describes them, generated from their schemas; 0 server errors, every answer well formed.

Bounded and derandomised (80 examples, the same every run); ``ZUTIS_SCHEMATHESIS_EXAMPLES`` runs longer."""

from __future__ import annotations

import collections
import os

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import wait_until_ready
from tests.service.test_fuzz import assert_well_formed

schemathesis = pytest.importorskip("schemathesis")

EXAMPLES = int(os.environ.get("ZUTIS_SCHEMATHESIS_EXAMPLES", "0")) or None


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_in_either_body(service_checkpoint):
    app = create_app(Settings(checkpoint=service_checkpoint, device="cpu", max_batch_size=2, max_concepts=5,
                              max_image_pixels=40 * 40, max_body_bytes=64 * 1024))
    seen: collections.Counter = collections.Counter()
    with TestClient(app) as client:  # runs the lifespan; schemathesis's own calls reach the same app
        wait_until_ready(client)
        operation = schemathesis.openapi.from_asgi("/openapi.json", app)["/segment"]["POST"]

        @settings(max_examples=EXAMPLES or 80, derandomize=EXAMPLES is None, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            response = case.call()
            seen[(case.media_type, response.status_code)] += 1
            assert_well_formed(_as_httpx_like(response))

        # hypothesis draws subnormal floats for the schema's numbers, which it cannot do in a thread that flushes
        # them to zero (tests/conftest.py sets that for this thread; the model's threads set their own).
        torch.set_flush_denormal(False)
        try:
            check()
        finally:
            torch.set_flush_denormal(True)
    media_types = {media_type for media_type, _ in seen}
    assert media_types == {"multipart/form-data", "application/json"}, seen


class _as_httpx_like:  # noqa: N801 - a thin view of schemathesis' response for assert_well_formed
    def __init__(self, response) -> None:
        self.status_code = response.status_code
        self.content = response.content
        self.text = response.content.decode("utf-8", "replace")

    def json(self):
        return self.response_json()

    def response_json(self):
        import json

        return json.loads(self.content)
