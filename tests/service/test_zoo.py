"""``ZUTIS_CHECKPOINT=zoo:NAME``: the service fetches the model from a mirror (a loopback server the tests start,
named by ``ZUTIS_ZOO_MANIFEST``) at start-up, alive but not ready meanwhile, then serves it; a failed fetch is one
line in the log and a non-zero exit; /info names the zoo model and the files' hashes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time

import pytest
from fastapi.testclient import TestClient

from model.download import FetchError
from model.fetch import checkpoint_path
from model.zoo import find_model
from service.app import create_app
from service.settings import Settings
from tests.model.conftest import tiny_official_conversion
from tests.model.mirror import Behaviour, MirrorServer, publish_tiny_release, write_manifest
from tests.service.conftest import png_bytes, segment, wait_until_ready
from tests.service.test_main import REPO_ROOT, service_env
from tests.support import free_port

ZUTIS = "zoo/coco_vit_tiny.pt"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return tiny_official_conversion(tmp_path_factory.mktemp("release"))


@pytest.fixture
def mirror(tmp_path, release, monkeypatch):
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    with MirrorServer() as running:
        running.manifest = write_manifest(tmp_path / "zoo.json",
                                          {"tiny-coco": publish_tiny_release(running, release)})
        yield running


def zoo_settings(tmp_path, mirror, **overrides) -> Settings:
    # input size 64: the tiny model's own (the official protocol's 640 would make its warm-up needlessly slow)
    return Settings(**{"checkpoint": "zoo:tiny-coco", "zoo_manifest": mirror.manifest, "cache_dir": tmp_path / "c",
                       "device": "cpu", "max_batch_size": 2, "input_size": 64, **overrides})


def test_service_fetches_at_start_up_alive_but_not_ready_meanwhile(tmp_path, mirror):
    gate = threading.Event()
    mirror.behaviour[ZUTIS] = Behaviour(gate=gate)
    with TestClient(create_app(zoo_settings(tmp_path, mirror))) as client:
        end = time.monotonic() + 30
        while not mirror.requests_for(ZUTIS) and time.monotonic() < end:
            time.sleep(0.02)
        assert mirror.requests_for(ZUTIS), "the service did not start fetching"
        health, ready = client.get("/healthz"), client.get("/readyz")
        assert health.status_code == 200 and health.json()["state"] == "loading"
        assert ready.status_code == 503 and ready.json()["type"] == "not_ready"
        gate.set()
        wait_until_ready(client)
        info = client.get("/info").json()
        assert info["zoo"]["name"] == "tiny-coco"
        files = info["zoo"]["files"]
        assert files["zutis"] == {"url": mirror.url(ZUTIS), "verified": False,
                                  "sha256": hashlib.sha256(mirror.files[ZUTIS]).hexdigest()}
        assert files["clip"]["verified"] is True
        assert files["clip"]["sha256"] == hashlib.sha256(mirror.files["zoo/ViT-tiny.pt"]).hexdigest()
        assert info["geometry"] == "native" and len(info["vocabulary"]) == 81
        model = find_model("tiny-coco", mirror.manifest)
        assert info["checkpoint"] == checkpoint_path(model, tmp_path / "c").name
        assert segment(client, png_bytes(40, 56), "cat,dog").status_code == 200


def test_second_start_uses_the_cache(tmp_path, mirror):
    for _ in range(2):
        with TestClient(create_app(zoo_settings(tmp_path, mirror))) as client:
            wait_until_ready(client)
            assert client.get("/info").json()["zoo"]["name"] == "tiny-coco"
    assert mirror.full_downloads(ZUTIS) == 1 and len(mirror.requests_for(ZUTIS)) == 1


@pytest.mark.parametrize("runtime", ["torch", "openvino"])
def test_a_zoo_model_is_loaded_with_every_setting_a_checkpoint_file_gets(tmp_path, mirror, runtime):
    # The zoo's loader and a checkpoint file's are one: ZUTIS_RUNTIME, ZUTIS_DTYPE and ZUTIS_CACHE_DIR apply too.
    with TestClient(create_app(zoo_settings(tmp_path, mirror, runtime=runtime, dtype="float32"))) as client:
        wait_until_ready(client)
        info = client.get("/info").json()
    assert (info["runtime"], info["dtype"]) == (runtime, "float32")
    assert (tmp_path / "c" / "openvino").is_dir() == (runtime == "openvino")  # exports go to ZUTIS_CACHE_DIR


def test_unknown_zoo_name_fails_before_starting(tmp_path, mirror):
    with pytest.raises(ValueError, match="unknown zoo model 'nope' in .*zoo.json; known: tiny-coco"):
        create_app(zoo_settings(tmp_path, mirror, checkpoint="zoo:nope"))
    with pytest.raises(ValueError, match="zoo manifest not found: .*missing.json"):
        create_app(zoo_settings(tmp_path, mirror, zoo_manifest=tmp_path / "missing.json"))


def test_failed_fetch_fails_the_engine(tmp_path, mirror):
    mirror.behaviour[ZUTIS] = Behaviour(status=404)
    failures = []
    with TestClient(create_app(zoo_settings(tmp_path, mirror), on_fatal=failures.append)) as client:
        end = time.monotonic() + 30
        while not failures and time.monotonic() < end:
            time.sleep(0.02)
        assert [type(f) for f in failures] == [FetchError]
        assert str(failures[0]) == f"{mirror.url(ZUTIS)}: HTTP 404 Not Found"
        health = client.get("/healthz")
        assert health.status_code == 500 and "HTTP 404 Not Found" in health.json()["error"]
        assert client.get("/readyz").status_code == 503


@pytest.mark.slow
def test_python_m_service_exits_non_zero_with_one_line_when_the_fetch_fails(tmp_path, mirror):
    mirror.behaviour[ZUTIS] = Behaviour(html=True)
    env = service_env("zoo:tiny-coco", free_port(), ZOO_MANIFEST=str(mirror.manifest),
                      CACHE_DIR=str(tmp_path / "c"), INPUT_SIZE="64")
    env = {k: v for k, v in env.items() if "proxy" not in k.lower()}
    result = subprocess.run([sys.executable, "-m", "service"], capture_output=True, text=True, env=env,
                            cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert errors == [f"{errors[0].split(' ERROR ')[0]} ERROR service.engine: could not fetch the model: "
                      f"{mirror.url(ZUTIS)}: the server sent an HTML page (Content-Type text/html; charset=utf-8: "
                      f"'<!DOCTYPE html><html><head><title>Sign in</title></head><body>Please log in</bod'"
                      f"...), not the weights file; check the URL, or the mirror's login"], result.stderr
    assert "Traceback" not in result.stderr
    assert f"downloading {mirror.url(ZUTIS)}" in result.stderr  # progress in the log
    assert not (tmp_path / "c" / "checkpoints").exists() or not any((tmp_path / "c" / "checkpoints").iterdir())


@pytest.mark.slow
def test_python_m_service_serves_a_zoo_model(tmp_path, mirror):
    from tests.service.test_main import running_service

    log = tmp_path / "service.log"
    with running_service("zoo:tiny-coco", log, ZOO_MANIFEST=str(mirror.manifest), CACHE_DIR=str(tmp_path / "c"),
                         INPUT_SIZE="64", MAX_BATCH_SIZE="2") as service:
        info = service.get("/info").json()
        assert info["zoo"]["name"] == "tiny-coco" and info["zoo"]["files"]["clip"]["verified"] is True
        assert service.segment().status_code == 200
    text = log.read_text()
    assert "fetching zoo model tiny-coco" in text and f"downloading {mirror.url(ZUTIS)}" in text
    assert "tiny-coco: wrote" in text
