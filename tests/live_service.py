"""``python -m service`` as a real subprocess on a free port, for the tests that talk to it over HTTP (the demo
page in a browser, the client package and its command line)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.support import free_port, wait_for

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CHECKPOINT = REPO_ROOT / "weights" / "zutis-shapes.safetensors"
READY_TIMEOUT_S = 120.0


@contextmanager
def running_service(log: Path, checkpoint: Path = SHIPPED_CHECKPOINT, **settings: str) -> Iterator[str]:
    """Start the service with ``ZUTIS_<KEY>=value`` for each of ``settings`` (on the CPU, one torch thread, one
    image per batch unless given), wait until ``/readyz`` answers 200 and yield its base URL; SIGTERM it at the
    end. The caller's own ``ZUTIS_*`` variables are not passed on."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZUTIS_")}
    env.update(ZUTIS_CHECKPOINT=str(checkpoint), ZUTIS_DEVICE="cpu", ZUTIS_HOST="127.0.0.1", ZUTIS_PORT=str(port),
               ZUTIS_TORCH_THREADS="1", ZUTIS_MAX_BATCH_SIZE="1", OMP_WAIT_POLICY="PASSIVE",
               ZUTIS_CACHE_DIR=str(log.parent / "zutis-cache"))  # not the user's ~/.cache
    env.update({f"ZUTIS_{key.upper()}": value for key, value in settings.items()})
    base = f"http://127.0.0.1:{port}"
    with open(log, "wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "service"], stdout=output, stderr=subprocess.STDOUT,
                                   env=env, cwd=REPO_ROOT)
    try:
        wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, READY_TIMEOUT_S, "service ready", process,
                 log, (httpx.HTTPError,))
        yield base
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
