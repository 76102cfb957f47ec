"""``python -m service`` as a real subprocess on a free port, for the tests that talk to it over HTTP (the demo
page in a browser, the client package and its command line)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from benchmarks.fixtures import REPO_ROOT, free_port, start_service, stop
from tests.support import wait_for

SHIPPED_CHECKPOINT = REPO_ROOT / "weights" / "zutis-shapes.safetensors"
READY_TIMEOUT_S = 120.0


@contextmanager
def running_service(log: Path, checkpoint: Path = SHIPPED_CHECKPOINT, **settings: str) -> Iterator[str]:
    """Start the service with ``ZUTIS_<KEY>=value`` for each of ``settings`` (on the CPU, one torch thread, one
    image per batch unless given), wait until ``/readyz`` answers 200 and yield its base URL; SIGTERM it at the
    end. The caller's own ``ZUTIS_*`` variables are not passed on."""
    port = free_port()
    process = start_service(checkpoint, port, log, extra_env={"OMP_WAIT_POLICY": "PASSIVE"},
                            **{"device": "cpu", "torch_threads": 1, "max_batch_size": 1,
                               "cache_dir": str(log.parent / "zutis-cache"),  # not the user's ~/.cache
                               **settings})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, READY_TIMEOUT_S, "service ready", process,
                 log, (httpx.HTTPError,))
        yield base
    finally:
        stop(process, 30)
