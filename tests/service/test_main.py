"""``python -m service`` as a real subprocess: it serves, and on SIGTERM it refuses new work, still answers the
request in flight, and exits 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import png_bytes
from tests.support import free_port, wait_for

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
HTTP_ERRORS = (httpx.HTTPError,)


def test_sigterm_drains_the_request_in_flight_then_exits_0(service_checkpoint, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZUTIS_")}
    # A long batching delay keeps a lone request inside the engine for ~2 s: the SIGTERM lands while it waits.
    env.update(ZUTIS_CHECKPOINT=str(service_checkpoint), ZUTIS_DEVICE="cpu", ZUTIS_HOST="127.0.0.1",
               ZUTIS_PORT=str(port), ZUTIS_MAX_BATCH_SIZE="2", ZUTIS_MAX_BATCH_DELAY_MS="2000",
               ZUTIS_TORCH_THREADS="1")
    log = tmp_path / "service.log"
    with open(log, "wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "service"], stdout=output, stderr=subprocess.STDOUT,
                                   env=env, cwd=REPO_ROOT)
    try:
        wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, 90, "ready", process, log, HTTP_ERRORS)
        result: dict = {}

        def post() -> None:
            files = {"image": ("x.png", png_bytes(30, 40), "image/png")}
            result["answer"] = httpx.post(f"{base}/segment", files=files, data={"concepts": "cat,dog"}, timeout=60)

        in_flight = threading.Thread(target=post)
        in_flight.start()
        wait_for(lambda: re.search(r"^zutis_inflight_requests 1\.0$", httpx.get(f"{base}/metrics").text, re.M),
                 10, "request in flight", process, log, HTTP_ERRORS)
        process.send_signal(signal.SIGTERM)

        # New work is refused: 503 while the socket is still open, connection refused once it is closed.
        try:
            late = httpx.get(f"{base}/readyz", timeout=5)
            assert late.status_code == 503 and late.json()["type"] == "draining", late.text
        except httpx.TransportError:
            pass

        in_flight.join(60)
        answer = result["answer"]
        assert answer.status_code == 200, answer.text
        assert answer.json()["concepts"] == ["background", "cat", "dog"]
        assert process.wait(timeout=30) == 0, log.read_text()
        text = log.read_text()
        assert "draining" in text and "stopped" in text, text
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_missing_checkpoint_names_the_file(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZUTIS_")}
    missing = tmp_path / "nowhere.safetensors"
    env.update(ZUTIS_CHECKPOINT=str(missing), ZUTIS_PORT=str(free_port()))
    done = subprocess.run([sys.executable, "-m", "service"], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert f"checkpoint file not found: {missing}" in done.stderr
