"""Readiness through the lifecycle (loading, warming, ready, draining), overload and deadlines, through the app."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from tests.service.conftest import png_bytes, segment, wait_until_ready
from tests.service.test_errors import assert_error


def wait_for(check, timeout_s: float = 30.0) -> None:
    end = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)


def test_not_ready_until_warm_up_at_every_batch_size_is_done(make_client, instrumented):
    predictor, loader = instrumented
    predictor.gate.clear()  # hold the first warm-up forward pass
    client = make_client(wait=False, loader=loader, max_batch_size=5)
    wait_for(lambda: predictor.batch_sizes == [1])
    ready = client.get("/readyz")
    assert_error(ready, 503, "not_ready", "warming")
    assert ready.headers["retry-after"] == "1"
    assert client.get("/healthz").json() == {"status": "ok", "state": "warming"}
    assert_error(segment(client, png_bytes(16, 16), "cat"), 503, "not_ready", "warming")
    assert "zutis_ready 0.0" in client.get("/metrics").text

    predictor.gate.set()
    wait_until_ready(client)
    assert predictor.batch_sizes == [1, 2, 3, 4, 5]  # every batch size, before the first request
    assert "zutis_ready 1.0" in client.get("/metrics").text
    assert segment(client, png_bytes(16, 16), "cat").status_code == 200
    assert client.get("/info").json()["state"] == "ready"


def test_loading_failure_is_reported(make_client):
    def broken_loader():
        raise ValueError("weights are corrupt")

    client = make_client(wait=False, loader=broken_loader)
    wait_for(lambda: client.get("/healthz").status_code != 200)
    assert_error(client.get("/healthz"), 500, "internal_error", "weights are corrupt")
    assert_error(client.get("/readyz"), 503, "not_ready", "failed")


def test_draining_refuses_new_work_and_answers_accepted_requests(make_client, instrumented):
    predictor, loader = instrumented
    client = make_client(loader=loader)
    engine = client.app.state.engine
    predictor.delay_s = 0.5
    with ThreadPoolExecutor(1) as pool:
        accepted = pool.submit(segment, client, png_bytes(20, 20), "cat")
        wait_for(lambda: engine.admitted == 1)
        engine.begin_drain()  # what SIGTERM does (service.__main__)
        assert_error(client.get("/readyz"), 503, "draining")
        refused = segment(client, png_bytes(20, 20), "cat")
        assert_error(refused, 503, "draining", "shutting down")
        assert refused.headers["retry-after"] == "1"
        assert client.get("/healthz").json()["state"] == "draining"
        assert accepted.result().status_code == 200


def test_overload_answers_503_at_once_never_500(make_client, instrumented):
    predictor, loader = instrumented
    client = make_client(loader=loader, queue_size=2, max_batch_size=1)
    predictor.delay_s = 0.4
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: segment(client, png_bytes(20, 20, seed=i), "cat"), range(8)))
    codes = sorted(a.status_code for a in answers)
    assert set(codes) == {200, 503}, codes
    assert codes.count(200) >= 2
    for answer in answers:
        if answer.status_code == 503:
            assert_error(answer, 503, "queue_full", "capacity")
            assert answer.headers["retry-after"] == "1"
    assert 'zutis_requests_rejected_total{reason="queue_full"} ' + f"{codes.count(503)}.0" in client.get("/metrics").text


def test_deadline_gives_504_and_expired_requests_never_reach_the_model(make_client, instrumented):
    predictor, loader = instrumented
    client = make_client(loader=loader, request_timeout_s=0.5, max_batch_size=1)
    warm_up = len(predictor.batch_sizes)
    predictor.delay_s = 1.5
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda i: segment(client, png_bytes(20, 20, seed=i), "cat"), range(3)))
    for answer in answers:
        assert_error(answer, 504, "deadline_exceeded", "deadline")
    time.sleep(2.0)  # let the engine reach the two that waited behind the first
    assert len(predictor.batch_sizes) - warm_up == 1
    predictor.delay_s = 0.0
    assert segment(client, png_bytes(20, 20), "cat").status_code == 200


def test_info_and_log_say_which_precision_and_runtime_and_why(make_client, caplog):
    """With nothing set: bfloat16 where this CPU has it natively, OpenVINO when installed (else float32 / torch);
    asked for: float32 on torch. Both in /info and in the start-up log line."""
    import logging

    from model.dtypes import native_bf16_feature
    from model.runtime import openvino_available

    caplog.set_level(logging.INFO, logger="service.engine")
    info = make_client().get("/info").json()
    feature = native_bf16_feature()
    assert info["dtype"] == ("bfloat16" if feature else "float32")
    assert info["dtype_reason"] == (f"auto on a CPU with native bfloat16 ({feature})" if feature else
                                    "auto on a CPU without native bfloat16 (no AMX or AVX-512 BF16)")
    assert info["runtime"] == ("openvino" if openvino_available() else "torch")
    assert info["runtime_reason"].startswith("auto on a CPU")
    assert f"({info['dtype']}: {info['dtype_reason']}; runtime {info['runtime']}: " in caplog.text

    info = make_client(dtype="float32", runtime="torch").get("/info").json()
    assert (info["dtype"], info["dtype_reason"]) == ("float32", "float32 asked for")
    assert (info["runtime"], info["runtime_reason"]) == ("torch", "runtime=torch asked for")
