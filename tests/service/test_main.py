"""``python -m service`` as a real subprocess: the request-head limit, the drain that load balancers see on
SIGTERM (with requests in flight), loading progress in the log, and one-line errors for bad settings."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from benchmarks.fixtures import REPO_ROOT
from benchmarks.fixtures import service_env as fixture_service_env
from benchmarks.fixtures import start_service
from tests.service.conftest import png_bytes
from tests.support import free_port, wait_for

pytestmark = pytest.mark.slow

HTTP_ERRORS = (httpx.HTTPError,)


@dataclass
class Service:
    process: subprocess.Popen
    base: str
    port: int
    log: Path

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(f"{self.base}{path}", timeout=kwargs.pop("timeout", 10), **kwargs)

    def segment(self, seed: int = 0, timeout: float = 60) -> httpx.Response:
        files = {"image": ("x.png", png_bytes(30, 40, seed=seed), "image/png")}
        return httpx.post(f"{self.base}/segment", files=files, data={"concepts": "cat,dog"}, timeout=timeout)

    def inflight(self) -> int:
        match = re.search(r"^zutis_inflight_requests (\S+)$", self.get("/metrics").text, re.M)
        return int(float(match.group(1)))


def service_settings(checkpoint: Path | str, settings: dict[str, str]) -> dict[str, str]:
    """The settings of a test's service: CPU, one torch thread, the OpenVINO exports beside a checkpoint file (a
    zoo checkpoint keeps the tests' temporary ``ZUTIS_CACHE_DIR``), never in the user's ~/.cache; then
    ``settings`` (keys as in ``ZUTIS_<KEY>``, any case)."""
    defaults = {"device": "cpu", "torch_threads": "1"}
    if isinstance(checkpoint, Path):
        defaults["cache_dir"] = str(checkpoint.parent / "zutis-cache")
    return {**defaults, **{k.lower(): v for k, v in settings.items()}}


def service_env(checkpoint: Path | str, port: int, **settings: str) -> dict[str, str]:
    """``benchmarks.fixtures.service_env`` with ``service_settings``."""
    return fixture_service_env(checkpoint, port, **service_settings(checkpoint, settings))


@contextmanager
def running_service(checkpoint: Path, log: Path, **settings: str) -> Iterator[Service]:
    """``python -m service`` on a free port, ready; killed at the end if it is still running."""
    port = free_port()
    process = start_service(checkpoint, port, log, **service_settings(checkpoint, settings))
    service = Service(process, f"http://127.0.0.1:{port}", port, log)
    try:
        wait_for(lambda: service.get("/readyz").status_code == 200, 90, "ready", process, log, HTTP_ERRORS)
        yield service
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def raw_exchange(port: int, head: bytes, chunk: int = 1 << 20) -> tuple[bytes, float]:
    """Send ``head`` on a fresh connection (in chunks; the server may stop reading) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        start = time.perf_counter()
        try:
            for offset in range(0, len(head), chunk):
                sock.sendall(head[offset:offset + chunk])
        except OSError:
            pass  # the server closed its end: its answer is already on the way
        answer = b""
        while not answer.endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        return answer, time.perf_counter() - start


def test_request_head_limit_answers_431_fast_and_stalls_nobody(service_checkpoint, tmp_path):
    with running_service(service_checkpoint, tmp_path / "service.log", max_header_bytes="8192") as service:
        small, _ = raw_exchange(service.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 7000
                                + b"\r\nConnection: close\r\n\r\n")
        assert small.startswith(b"HTTP/1.1 200"), small[:200]
        # Bodies are not heads: an upload far larger than the head limit is answered as usual.
        files = {"image": ("x.png", png_bytes(64, 64, seed=5), "image/png")}
        upload = httpx.post(f"{service.base}/segment", files=files, data={"concepts": "cat"}, timeout=60)
        assert upload.status_code == 200 and int(upload.request.headers["content-length"]) > 8192, upload.text
        # Pipelined requests on one connection are each answered.
        with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\n"
                         b"Connection: close\r\n\r\n")
            both = b""
            while data := sock.recv(65536):
                both += data
        assert both.count(b"HTTP/1.1 200 OK") == 2, both
        for name, head in (("header", b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * (200 << 10) + b"\r\n\r\n"),
                           ("url", b"GET /healthz?" + b"q" * (200 << 10) + b" HTTP/1.1\r\n\r\n"),
                           ("many", b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 20_000 + b"\r\n")):
            answer, seconds = raw_exchange(service.port, head)
            assert answer.startswith(b"HTTP/1.1 431 "), (name, answer[:200])
            assert b'"type": "headers_too_large"' in answer and b"8,192 bytes" in answer
            assert seconds < 5, (name, seconds)

        # While a client streams a 64 MB header line, /healthz is not held up behind it.
        stop = threading.Event()

        def attack() -> None:
            while not stop.is_set():
                raw_exchange(service.port, b"GET / HTTP/1.1\r\nX-Big: " + b"a" * (64 << 20))

        attacker = threading.Thread(target=attack, daemon=True)
        attacker.start()
        try:
            latencies = []
            with httpx.Client(base_url=service.base, timeout=10) as client:
                for _ in range(30):
                    start = time.perf_counter()
                    assert client.get("/healthz").status_code == 200
                    latencies.append(time.perf_counter() - start)
        finally:
            stop.set()
            attacker.join(30)
        # Generous for a shared CI machine; benchmarks/header_bench.py measures it properly.
        assert sorted(latencies)[len(latencies) // 2] < 0.25, latencies
        metrics = service.get("/metrics").text
        assert re.search(r'^zutis_requests_rejected_total\{reason="headers_too_large"\} ([1-9]\d*)\.0$', metrics,
                         re.M)


def test_stalled_uploads_get_408_and_are_closed_while_the_service_answers(service_checkpoint, tmp_path):
    with running_service(service_checkpoint, tmp_path / "service.log", body_idle_timeout_s="1") as service:
        stalled = []
        part = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
                b"Content-Type: image/png\r\n\r\n" + png_bytes(30, 40, seed=1)[:40])
        json_part = b'{"concepts": ["cat"], "image": "iVBORw0KGgo'
        for k in range(20):  # each declares 50,000 bytes and sends the start of an upload: forms and JSON bodies
            sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
            content_type, body = ((b"multipart/form-data; boundary=b", part) if k % 2 else
                                  (b"application/json", json_part))
            sock.sendall(b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: " + content_type +
                         b"\r\nContent-Length: 50000\r\n\r\n" + body)
            stalled.append(sock)
        start = time.perf_counter()
        assert service.segment().status_code == 200  # a normal request meanwhile
        assert service.get("/healthz").status_code == 200
        try:
            for sock in stalled:
                answer = b""
                while data := sock.recv(65536):
                    answer += data
                assert answer.startswith(b"HTTP/1.1 408 ") and b'"type": "request_timeout"' in answer, answer[:300]
            assert time.perf_counter() - start < 1 + 4
        finally:
            for sock in stalled:
                sock.close()
        metrics = service.get("/metrics").text
        assert re.search(r'^zutis_requests_rejected_total\{reason="request_timeout"\} 20\.0$', metrics, re.M), metrics
        # The app's task that waited for the body is not counted twice, nor logged as an error.
        assert re.search(r'^zutis_requests_rejected_total\{reason="malformed_request"\} 0\.0$', metrics, re.M)
        assert re.search(r'^zutis_requests_total\{code="408",route="/segment"\} 20\.0$', metrics, re.M), metrics
        assert not re.search(r'^zutis_requests_total\{code="400"', metrics, re.M)
        assert "Traceback" not in service.log.read_text()


def test_sigterm_drains_as_load_balancers_expect_then_exits_0(service_checkpoint, tmp_path):
    # A long batching delay keeps requests inside the engine for ~4 s: the SIGTERM lands while they wait.
    log = tmp_path / "service.log"
    with running_service(service_checkpoint, log, max_batch_size="4", max_batch_delay_ms="4000",
                         drain_grace_s="1.0", drain_timeout_s="20") as service:
        answers: dict[str, httpx.Response] = {}

        def post(name: str, seed: int) -> threading.Thread:
            thread = threading.Thread(target=lambda: answers.__setitem__(name, service.segment(seed)))
            thread.start()
            return thread

        first = post("first", 1)
        wait_for(lambda: service.inflight() == 1, 10, "request in flight", service.process, log, HTTP_ERRORS)
        signalled = time.monotonic()
        service.process.send_signal(signal.SIGTERM)

        # Still listening: probes see 503 "draining", not a refused connection.
        ready = service.get("/readyz")
        assert ready.status_code == 503 and ready.json()["type"] == "draining", ready.text
        assert ready.headers["retry-after"] == "1"
        # Grace period: new work is still accepted (Kubernetes may still route some here).
        second = post("second", 2)
        wait_for(lambda: service.inflight() == 2, 5, "second request admitted", service.process, log, HTTP_ERRORS)
        assert time.monotonic() - signalled < 1.0, "the grace period ended before the check"
        # After the grace period: refused with Retry-After, and the connection is closed.
        wait_for(lambda: time.monotonic() - signalled > 1.3, 5, "grace over")
        refused = service.segment(3, timeout=10)
        assert refused.status_code == 503 and refused.json()["type"] == "draining", refused.text
        assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"
        assert service.get("/healthz").json() == {"status": "ok", "state": "draining"}
        assert service.inflight() == 2, "the accepted requests finished before the checks: raise the delay"

        first.join(60)
        second.join(60)
        for name in ("first", "second"):
            assert answers[name].status_code == 200, answers[name].text
            assert answers[name].json()["concepts"] == ["background", "cat", "dog"]
        assert service.process.wait(timeout=30) == 0, log.read_text()
        assert time.monotonic() - signalled < 20
        with pytest.raises(httpx.TransportError):
            service.get("/healthz", timeout=2)
    text = log.read_text()
    # OpenVINO (ZUTIS_RUNTIME=auto on a CPU, when installed) runs a batch image by image: batch size 1 warms it all
    warm_up = "warm-up: batch size 1/1" if "runtime openvino" in text else "warm-up: batch size 4/4"
    for line in ("loading the model", warm_up, "ready:", "grace period", "draining:", "stopped"):
        assert line in text, (line, text)


def test_drain_timeout_bounds_the_shutdown(service_checkpoint, tmp_path):
    log = tmp_path / "service.log"
    with running_service(service_checkpoint, log, max_batch_size="2", max_batch_delay_ms="10000",
                         drain_timeout_s="2") as service:
        result: dict[str, object] = {}

        def post() -> None:
            try:
                result["answer"] = service.segment(timeout=30)
            except httpx.HTTPError as error:
                result["answer"] = error

        stuck = threading.Thread(target=post)
        stuck.start()
        wait_for(lambda: service.inflight() == 1, 10, "request in flight", service.process, log, HTTP_ERRORS)
        signalled = time.time()
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(timeout=15) == 0, log.read_text()
        # The drain itself, from the service's own log (process start-up and teardown on a busy CI machine vary).
        stopped = re.search(r"^(\S+ \S+) INFO service: stopped$", log.read_text(), re.M)
        assert stopped, log.read_text()
        stopped_at = datetime.strptime(stopped.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        assert stopped_at - signalled < 2.5, (stopped_at - signalled, log.read_text())
        assert time.time() - signalled < 12
        stuck.join(30)
    answer = result["answer"]
    assert isinstance(answer, httpx.Response) and answer.status_code == 503, answer
    assert answer.json()["type"] == "draining" and "drain timeout" in answer.json()["error"]
    assert "drain timeout: 1 request(s) still unanswered" in log.read_text()


@pytest.mark.parametrize("variable,value,message", [
    ("ZUTIS_MAX_BATCH_SIZE", "0", "invalid setting: ZUTIS_MAX_BATCH_SIZE=0: should be greater than or equal to 1"),
    ("ZUTIS_DRAIN_GRACE_S", "60", "ZUTIS_DRAIN_GRACE_S=60: must be less than ZUTIS_DRAIN_TIMEOUT_S (30)"),
    ("ZUTIS_LOG_LEVEL", "loud", "ZUTIS_LOG_LEVEL=loud: should be 'critical', 'error', 'warning', 'info' or 'debug'"),
])
def test_bad_settings_exit_2_with_one_line(tmp_path, variable, value, message):
    env = service_env(tmp_path / "unused.safetensors", free_port(), **{variable.removeprefix("ZUTIS_"): value})
    done = subprocess.run([sys.executable, "-m", "service"], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert message in lines[0]


def test_missing_checkpoint_names_the_file(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    env = service_env(missing, free_port())
    done = subprocess.run([sys.executable, "-m", "service"], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert f"checkpoint file not found: {missing}" in done.stderr
