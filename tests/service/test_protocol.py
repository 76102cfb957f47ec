"""service.protocol under a real uvicorn server on loopback (a tiny echo app, no model): the upload deadlines
(408 + closed), slow-but-progressing bodies that finish in time, the head deadline, and the connection cap (503)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import uvicorn

from service.protocol import ConnectionLimits, guarded_protocol
from tests.support import free_port, wait_for

IDLE_S, BODY_S, HEAD_S = 0.6, 2.5, 1.0


async def echo_app(scope, receive, send) -> None:
    """Reads the whole body and answers its length (as JSON)."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": message["type"] + ".complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = json.dumps({"received": size}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@contextmanager
def serving(**limits) -> Iterator[tuple[int, list[str]]]:
    """The echo app under uvicorn with the guarded protocol, in a thread; yields (port, refusal reasons)."""
    reasons: list[str] = []
    limits = {"head_timeout_s": HEAD_S, "body_idle_timeout_s": IDLE_S, "body_timeout_s": BODY_S, **limits}
    port = free_port()
    config = uvicorn.Config(echo_app, host="127.0.0.1", port=port, log_level="critical", lifespan="on",
                            http=guarded_protocol(ConnectionLimits(**limits), reasons.append))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 10, "uvicorn started")
        yield port, reasons
    finally:
        server.should_exit = True
        thread.join(10)


def upload_head(length: int) -> bytes:
    return f"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode()


def read_until_closed(sock: socket.socket, timeout_s: float = 10) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (perf_counter)."""
    sock.settimeout(timeout_s)
    answer = b""
    while data := sock.recv(65536):
        answer += data
    return answer, time.perf_counter()


def json_body(answer: bytes) -> dict:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


def test_stalled_body_gets_408_and_is_closed_within_the_idle_timeout():
    with serving() as (port, reasons), socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(upload_head(50_000) + b"x" * 100)
        start = time.perf_counter()
        answer, closed = read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert json_body(answer) == {"error": f"no byte of the request body arrived for {IDLE_S:g} s",
                                     "type": "request_timeout"}
        assert b"connection: close" in answer.lower()
        # Closed after the idle timeout, not before, and well within it plus the linger (2 s at most).
        assert IDLE_S * 0.9 <= closed - start < IDLE_S + 3, closed - start
        assert reasons == ["request_timeout"]


def test_slow_but_progressing_body_that_finishes_in_time_succeeds():
    with serving() as (port, reasons), socket.create_connection(("127.0.0.1", port)) as sock:
        pieces = 8  # a piece every 0.2 s: each pause under the idle timeout, 1.6 s in all (under the body's 2.5 s)
        sock.sendall(upload_head(pieces * 10))
        for _ in range(pieces):
            time.sleep(IDLE_S / 3)
            sock.sendall(b"y" * 10)
        sock.shutdown(socket.SHUT_WR)
        answer, _ = read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert json_body(answer) == {"received": pieces * 10}
        assert reasons == []


def test_body_still_incomplete_at_the_whole_body_deadline_gets_408():
    with serving() as (port, reasons), socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(upload_head(10_000))
        start = time.perf_counter()
        answer = b""
        sock.settimeout(IDLE_S / 3)
        while time.perf_counter() - start < BODY_S + 3:  # a byte every 0.2 s: never idle, never done
            try:
                sock.sendall(b"z")
                data = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            answer += data
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert json_body(answer)["error"] == f"the request body was not complete within {BODY_S:g} s"
        assert BODY_S * 0.9 <= time.perf_counter() - start < BODY_S + 3
        assert reasons == ["request_timeout"]


@pytest.mark.parametrize("sent", [b"", b"POST /up HTTP/1.1\r\nHost: x\r\n"], ids=["nothing", "half a head"])
def test_incomplete_head_gets_408_and_is_closed_within_the_head_timeout(sent):
    with serving() as (port, reasons), socket.create_connection(("127.0.0.1", port)) as sock:
        start = time.perf_counter()
        sock.sendall(sent)
        answer, closed = read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert json_body(answer)["type"] == "request_timeout"
        assert HEAD_S * 0.9 <= closed - start < HEAD_S + 3
        assert reasons == ["request_timeout"]


def test_kept_alive_connection_serves_several_requests_without_spurious_timeouts():
    with serving() as (port, reasons), socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        for index in range(3):
            time.sleep(HEAD_S * 0.7)  # pauses between requests, each under the head timeout
            sock.sendall(upload_head(4) + b"abcd")
            answer = b""
            while not answer.endswith(b"}"):
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"received": 4}'), (index, answer)
        assert reasons == []


def test_connection_over_the_cap_gets_503_at_once_and_the_cap_frees_up():
    with serving(max_connections=3, head_timeout_s=30.0) as (port, reasons):
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            time.sleep(0.2)  # the server has accepted them
            with socket.create_connection(("127.0.0.1", port)) as extra:
                extra.sendall(upload_head(4) + b"abcd")
                answer, _ = read_until_closed(extra, timeout_s=5)
            assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
            assert b"retry-after: 1" in answer.lower()
            assert json_body(answer) == {"error": "the service has the most open connections it accepts (3); retry "
                                                  "later", "type": "too_many_connections"}
            assert reasons == ["too_many_connections"]
        finally:
            for sock in held:
                sock.close()

        def served() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(upload_head(4) + b"abcd")
                return sock.recv(65536).startswith(b"HTTP/1.1 200 ")

        wait_for(served, 5, "a connection served once the held ones closed")
