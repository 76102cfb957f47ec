"""The Docker image, built from the Dockerfile and run with Debian's podman: readiness, a real answer, the non-root
user, the HEALTHCHECK, and SIGTERM with 8 requests in flight (none lost, exit 0).

No container registry is reachable here, so the Dockerfile's base (python:3.11-slim-bookworm) is a stand-in
bootstrapped with debootstrap under that name (tests/deploy/container.py says how and why). The first build
installs the service's dependencies (torch included) from PyPI inside the build and takes minutes; later builds
reuse podman's layer cache. The whole module shares one build and one running container.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from model.checkpoint import read_metadata
from tests.deploy.container import (BASE_IMAGE, IMAGE, RUN_FLAGS, build_image, ensure_base_image, image_exists,
                                    podman)
from tests.deploy.support import REPO_ROOT, require_executable
from tests.live_service import SHIPPED_CHECKPOINT
from tests.support import free_port, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.integration]

EXAMPLE = REPO_ROOT / "examples" / "shapes-1.png"
IN_FLIGHT = 8
# The 8 requests wait in the batcher for a batch of 9 that never fills: SIGTERM lands while all 8 are in flight.
BATCH_DELAY_MS = 5000


@dataclass
class Container:
    name: str
    base: str
    log: Path

    def inspect(self, template: str) -> str:
        return podman("inspect", "--format", template, self.name).stdout.strip()

    def healthcheck(self) -> subprocess.CompletedProcess:
        return podman("healthcheck", "run", self.name, check=False, timeout=60)

    def inflight(self) -> int:
        text = httpx.get(f"{self.base}/metrics", timeout=5).text
        return int(float(re.search(r"^zutis_inflight_requests (\S+)$", text, re.M).group(1)))


@pytest.fixture(scope="module")
def image() -> str:
    for tool, package in (("podman", "podman"), ("runc", "runc"), ("debootstrap", "debootstrap")):
        require_executable(tool, f"apt-get install {package}", required_in_ci=True)
    if not SHIPPED_CHECKPOINT.exists():
        pytest.skip("no weights/zutis-shapes.safetensors to bake into the image")
    assert ensure_base_image() == BASE_IMAGE and image_exists(BASE_IMAGE)
    return build_image(IMAGE)


@pytest.fixture(scope="module")
def container(image, tmp_path_factory) -> Iterator[Container]:
    port = free_port()
    name = f"zutis-test-{port}"
    log = tmp_path_factory.mktemp("image") / "container.log"
    # RLIMIT_NPROC: podman's default for a rootful container is more than this machine lets runc set.
    podman("run", "-d", *RUN_FLAGS, "--ulimit", "nproc=4096:4096", "--name", name,
           "-e", "ZUTIS_HOST=127.0.0.1", "-e", f"ZUTIS_PORT={port}", "-e", "ZUTIS_TORCH_THREADS=1",
           "-e", f"ZUTIS_MAX_BATCH_SIZE={IN_FLIGHT + 1}", "-e", f"ZUTIS_MAX_BATCH_DELAY_MS={BATCH_DELAY_MS}",
           image, timeout=120)
    running = Container(name, f"http://127.0.0.1:{port}", log)
    try:
        wait_for(lambda: httpx.get(f"{running.base}/readyz", timeout=5).status_code == 200, 300,
                 "the container's service ready", ignore=(httpx.HTTPError,))
        yield running
    finally:
        log.write_text(podman("logs", name, check=False).stdout + podman("logs", name, check=False).stderr)
        podman("rm", "-f", name, check=False)


def test_image_runs_as_uid_10001_and_the_healthcheck_follows_readiness(container):
    assert container.inspect("{{.Config.User}}") == "10001:10001"
    pid = int(container.inspect("{{.State.Pid}}"))
    uids = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:"))
    assert uids.split()[1:] == ["10001"] * 4, uids  # real, effective, saved and file-system uid of python
    assert podman("exec", container.name, "id", "-u").stdout.strip() == "10001"
    check = container.inspect("{{json .Config.Healthcheck.Test}}")  # kept by --format docker (OCI drops it)
    assert "/readyz" in check and "ZUTIS_PORT" in check, check
    healthy = container.healthcheck()
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert container.inspect("{{.State.Health.Status}}") == "healthy"


def test_image_answers_segment_with_its_baked_checkpoint(container):
    answer = httpx.post(f"{container.base}/segment", files={"image": EXAMPLE.open("rb")},
                        data={"concepts": "red circle, blue star, green heart"}, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    sha = hashlib.sha256(SHIPPED_CHECKPOINT.read_bytes()).hexdigest()
    assert body["model"] == f"{read_metadata(SHIPPED_CHECKPOINT).model_id}@{sha[:12]}"  # the same weights
    assert body["image"] == {"width": 128, "height": 128}
    assert body["concepts"] == ["background", "red circle", "blue star", "green heart"]
    assert len(body["instances"]) >= 2
    info = httpx.get(f"{container.base}/info", timeout=10).json()
    assert info["device"] == "cpu" and info["limits"]["max_connections"] == 20000 - 20000 // 8  # --ulimit nofile


def test_image_drains_8_requests_in_flight_on_podman_stop_and_exits_0(container):
    answers: list[httpx.Response | Exception] = []
    lock = threading.Lock()

    def post(seed: int) -> None:
        try:
            result: httpx.Response | Exception = httpx.post(
                f"{container.base}/segment", files={"image": EXAMPLE.open("rb")},
                data={"concepts": f"red circle, concept {seed}"}, timeout=60)
        except httpx.HTTPError as error:
            result = error
        with lock:
            answers.append(result)

    clients = [threading.Thread(target=post, args=(seed,)) for seed in range(IN_FLIGHT)]
    for thread in clients:
        thread.start()
    wait_for(lambda: container.inflight() == IN_FLIGHT, 20, f"{IN_FLIGHT} requests in flight")
    stopped: dict[str, object] = {}

    def stop() -> None:
        start = time.monotonic()
        stopped["result"] = podman("stop", "-t", "60", container.name, check=False, timeout=120)
        stopped["seconds"] = time.monotonic() - start

    stopper = threading.Thread(target=stop)
    stopper.start()  # SIGTERM (the image's STOPSIGNAL); podman waits up to 60 s before SIGKILL
    # While it drains: readiness is off, so the HEALTHCHECK fails, and the accepted requests are still there.
    wait_for(lambda: httpx.get(f"{container.base}/readyz", timeout=5).status_code == 503, 10, "readiness off",
             ignore=(httpx.HTTPError,))
    assert container.healthcheck().returncode != 0
    assert container.inflight() == IN_FLIGHT, "the requests finished before the checks: raise BATCH_DELAY_MS"
    stopper.join(120)
    for thread in clients:
        thread.join(60)
    assert stopped["result"].returncode == 0, stopped["result"].stderr
    assert len(answers) == IN_FLIGHT
    for answer in answers:
        assert isinstance(answer, httpx.Response) and answer.status_code == 200, answer
        assert answer.json()["concepts"][:2] == ["background", "red circle"]
    assert container.inspect("{{.State.Status}}") == "exited"
    assert container.inspect("{{.State.ExitCode}}") == "0"
    assert stopped["seconds"] < 30, "exited by itself, long before podman's SIGKILL"
    print(f"podman stop with {IN_FLIGHT} requests in flight: {IN_FLIGHT} x 200, exit 0 after "
          f"{stopped['seconds']:.1f} s")
