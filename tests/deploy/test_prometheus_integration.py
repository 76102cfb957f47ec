"""The real service and a real Prometheus on loopback: what Prometheus scrapes is what the dashboard needs.

`python -m service` runs as a subprocess with a tiny random checkpoint on the CPU; Prometheus (Debian's package)
scrapes it every second with a generated config. Both are stopped at the end, whatever happens. Without a
`prometheus` binary the test skips, except in CI (CI=true), which installs it, where it fails.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tests.deploy.support import REPO_ROOT, require_executable, series_names
from tests.support import free_port, tail, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "zutis.json"
REQUESTS = 30
STARTUP_TIMEOUT_S = 90.0
SCRAPE_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 30.0  # docker-compose.yml's stop_grace_period


@contextmanager
def running(command: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Run `command` with output to `log`; on exit, SIGTERM it (if still running) and, failing that, SIGKILL."""
    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        try:
            yield process
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=DRAIN_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def promql(prometheus_port: int, query: str) -> dict:
    """The `data` of an instant query to Prometheus's HTTP API (raises on an error answer)."""
    url = f"http://127.0.0.1:{prometheus_port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    status, body = get(url)
    answer = json.loads(body)
    if status != 200 or answer.get("status") != "success":
        raise AssertionError(f"Prometheus rejected {query!r}: {status} {answer}")
    return answer["data"]


def tiny_checkpoint(directory: Path) -> Path:
    """A tiny randomly initialised checkpoint in the service's format, written to `directory`."""
    from tests.model.conftest import make_tiny_checkpoint

    return make_tiny_checkpoint(directory / "tiny.safetensors")


def png_image(height: int, width: int, seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def post_segment(port: int, image: bytes, concepts: list[str]) -> int:
    import httpx

    files = {"image": ("image.png", image, "image/png")}
    answer = httpx.post(
        f"http://127.0.0.1:{port}/segment", files=files, data={"concepts": ",".join(concepts)}, timeout=60
    )
    return answer.status_code


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    return require_executable("prometheus", "apt-get install prometheus", required_in_ci=True)


def test_prometheus_scrapes_request_latency_from_the_service(prometheus_binary, tmp_path):
    service_port, prometheus_port = free_port(), free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("ZUTIS_")}
    env.update(
        ZUTIS_CHECKPOINT=str(tiny_checkpoint(tmp_path)),
        ZUTIS_DEVICE="cpu",
        ZUTIS_CACHE_DIR=str(tmp_path / "zutis-cache"),
        ZUTIS_HOST="127.0.0.1",
        ZUTIS_PORT=str(service_port),
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "zutis",
            "metrics_path": "/metrics",
            "static_configs": [{"targets": [f"127.0.0.1:{service_port}"]}],
        }],
    }), encoding="utf-8")
    service_log, prometheus_log = tmp_path / "service.log", tmp_path / "prometheus.log"

    with running([sys.executable, "-m", "service"], service_log, env) as service:
        wait_for(lambda: get(f"http://127.0.0.1:{service_port}/readyz")[0] == 200, STARTUP_TIMEOUT_S,
                 "service ready", service, service_log)
        with running([
            prometheus_binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
            "--log.level=warn",
        ], prometheus_log) as prometheus:
            wait_for(lambda: get(f"http://127.0.0.1:{prometheus_port}/-/ready")[0] == 200, 30.0,
                     "Prometheus ready", prometheus, prometheus_log)
            # A scrape before the traffic, so that rate() sees the counters grow (the first one takes ~5 s).
            wait_for(lambda: promql(prometheus_port, 'up{job="zutis"} == 1')["result"], SCRAPE_TIMEOUT_S,
                     "Prometheus scraping the service", prometheus, prometheus_log)

            codes = [post_segment(service_port, png_image(40 + i % 3 * 8, 48, seed=i), ["square", "circle"])
                     for i in range(REQUESTS)]
            assert codes == [200] * REQUESTS, f"/segment answered {codes}\n{tail(service_log)}"

            # Every series of the metric contract is exposed by the service ...
            exposed = get(f"http://127.0.0.1:{service_port}/metrics")[1].decode()
            missing = {name for name in series_names() if not re.search(rf"^{name}(\{{| )", exposed, re.M)}
            assert not missing, f"the service does not expose {sorted(missing)}"

            # ... and Prometheus turns the scraped histogram into a latency.
            query = "histogram_quantile(0.5, rate(zutis_request_duration_seconds_bucket[1m]))"

            def median_latency() -> list[float]:
                values = [float(sample["value"][1]) for sample in promql(prometheus_port, query)["result"]]
                return [value for value in values if math.isfinite(value)]

            latencies = wait_for(median_latency, SCRAPE_TIMEOUT_S, f"a finite value for {query}",
                                 prometheus, prometheus_log)
            assert all(0 < latency < 60 for latency in latencies), latencies

            # Every dashboard query is valid PromQL for this Prometheus and finds data.
            dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
            for panel in dashboard["panels"]:
                for target in panel["targets"]:
                    expression = target["expr"].replace("$__rate_interval", "1m")
                    assert promql(prometheus_port, expression)["result"], f"{panel['title']}: no data for {expression}"

        # SIGTERM, as `docker stop` sends it: the service drains and exits cleanly within the grace period.
        service.send_signal(signal.SIGTERM)
        try:
            returncode = service.wait(timeout=DRAIN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the service ignored SIGTERM for {DRAIN_TIMEOUT_S:.0f} s\n{tail(service_log)}")
        assert returncode == 0, f"exit status {returncode} after SIGTERM\n{tail(service_log)}"
