"""deploy/nginx/nginx.conf in a real nginx, in front of two stand-in replicas on loopback.

The stand-ins answer like the service does when it cannot take a request (503 + Retry-After, as while loading,
draining or with a full queue) or like a healthy replica (200), so the balancer's retry policy is exercised
without a model. Skips without nginx (apt-get install nginx-light), which CI installs.
"""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.deploy.support import REPO_ROOT, require_executable
from tests.support import free_port

NGINX_CONF = REPO_ROOT / "deploy" / "nginx" / "nginx.conf"
BOUNDARY = "zutisboundary"
BODY = (
    f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"concepts\"\r\n\r\ncat,dog\r\n"
    f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
    "Content-Type: image/png\r\n\r\n" + "x" * 2048 + f"\r\n--{BOUNDARY}--\r\n"
).encode()


class StandIn(http.server.ThreadingHTTPServer):
    """A replica stand-in on 127.0.0.1 that answers POSTs with a fixed status and counts the bodies it got."""

    def __init__(self, name: str, status: int):
        self.name, self.status, self.bodies = name, status, []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _StandInHandler)

    @property
    def port(self) -> int:
        return self.server_address[1]


class _StandInHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # nginx keeps upstream connections alive

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server: StandIn = self.server  # type: ignore[assignment]
        with server.lock:
            server.bodies.append(body)
        if server.status == 200:
            payload = json.dumps({"replica": server.name}).encode()
        else:
            payload = json.dumps({"error": "not ready", "type": "not_ready"}).encode()
        self.send_response(server.status)
        if server.status == 503:
            self.send_header("Retry-After", "1")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@contextmanager
def stand_ins(*statuses: int) -> Iterator[list[StandIn]]:
    servers = [StandIn(f"zutis-{index}", status) for index, status in enumerate(statuses)]
    threads = [threading.Thread(target=server.serve_forever, daemon=True) for server in servers]
    for thread in threads:
        thread.start()
    try:
        yield servers
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def local_config(replica_ports: list[int], listen_port: int, nginx: str) -> str:
    """The deployed nginx.conf with the compose host names and port replaced by loopback addresses."""
    config = NGINX_CONF.read_text(encoding="utf-8")
    servers = re.findall(r"server\s+(zutis-\d+):8000", config)
    assert len(servers) == len(replica_ports), f"nginx.conf has {servers}, the test has {len(replica_ports)} stand-ins"
    for name, port in zip(servers, replica_ports):
        config = config.replace(f"server {name}:8000", f"server 127.0.0.1:{port}")
    config = re.sub(r"listen\s+8000;", f"listen 127.0.0.1:{listen_port};", config)
    version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr
    if tuple(int(x) for x in re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", version).groups()) < (1, 27, 3):
        config = config.replace(" resolve ", " ")  # an older local nginx lacks `resolve`; loopback needs no DNS
    return config


@contextmanager
def running_nginx(tmp_path: Path, replica_ports: list[int]) -> Iterator[int]:
    nginx = require_executable("nginx", "apt-get install nginx-light", required_in_ci=True)
    port = free_port()
    (tmp_path / "nginx.conf").write_text(local_config(replica_ports, port, nginx), encoding="utf-8")
    log = open(tmp_path / "nginx.log", "wb")
    process = subprocess.Popen(
        [nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", "stderr",
         "-g", f"daemon off; pid {tmp_path / 'nginx.pid'};"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1)
            except urllib.error.HTTPError:
                break  # nginx answers (its own 404 for /metrics): it is up
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"nginx did not start: {(tmp_path / 'nginx.log').read_text()}")
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


def post_segment(port: int) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/segment", data=BODY, method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_nginx_sends_a_refused_post_to_the_next_replica(tmp_path):
    with stand_ins(503, 200) as (refusing, ready), running_nginx(tmp_path, [refusing.port, ready.port]) as port:
        answers = [post_segment(port) for _ in range(20)]
    assert [status for status, _, _ in answers] == [200] * 20
    assert all(json.loads(body) == {"replica": "zutis-1"} for _, _, body in answers)
    # The refusing replica was asked, and the retried POST reached the ready one with its body intact.
    assert refusing.bodies, "nginx never tried the refusing replica: the retry path was not exercised"
    assert set(refusing.bodies) == {BODY} and set(ready.bodies) == {BODY}


def test_nginx_passes_the_services_503_through_when_every_replica_refuses(tmp_path):
    # Not nginx's own 502 "no live upstreams": clients must keep getting the service's 503 and its Retry-After.
    with stand_ins(503, 503) as replicas, running_nginx(tmp_path, [r.port for r in replicas]) as port:
        answers = [post_segment(port) for _ in range(5)]
    for status, headers, body in answers:
        assert status == 503
        assert headers.get("Retry-After") == "1"
        assert json.loads(body)["type"] == "not_ready"
    assert all(len(replica.bodies) == 5 for replica in replicas), "each request should try every replica once"


def test_nginx_does_not_expose_one_replicas_metrics(tmp_path):
    with stand_ins(200, 200) as replicas, running_nginx(tmp_path, [r.port for r in replicas]) as port:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert refused.value.code == 404
