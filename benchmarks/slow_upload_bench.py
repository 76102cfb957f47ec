"""Stalled uploads against a real ``python -m service``: are they all closed in time, and does everyone else wait?

Starts the service (default settings unless given: ``ZUTIS_BODY_IDLE_TIMEOUT_S`` 10 s) on a free port, then:

1. baseline: ``--probes`` sequential ``GET /healthz`` and ``--segments`` sequential ``POST /segment`` (an example
   image, two concepts), timed;
2. attack: ``--connections`` connections each send a ``POST /segment`` head declaring ``Content-Length: 50000`` and
   the first 100 bytes of a multipart upload, then nothing;
3. during the attack, from its start until the last stalled connection is closed (the burst of 408s included):
   ``/healthz`` every 0.1 s and a ``/segment`` every fifth round, timed;
4. every attacking connection is watched until the service closes it: how long after its last byte, and what it
   was answered (408 ``request_timeout`` expected).

The benchmark raises its own open-file soft limit to the hard limit (the service, its child, inherits it; the
default ``ZUTIS_MAX_CONNECTIONS`` is sized from it), since 1,500 sockets on each side do not fit in the usual 1024.

    nice -n 10 python benchmarks/slow_upload_bench.py --connections 1500 --out /tmp/slow_upload.json
"""

from __future__ import annotations

import argparse
import os
import resource
import selectors
import socket
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.fixtures import example_png, free_port, rss_mb, start_service, stop, wait_ready  # noqa: E402 (importable once the line above ran)
from benchmarks.reports import latency_summary, write_json_report  # noqa: E402

STALLED_HEAD = (b"POST /segment HTTP/1.1\r\nHost: bench\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 50000\r\n\r\n")
STALLED_BODY = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
                b"Content-Type: image/png\r\n\r\n").ljust(100, b"\0")


def raise_open_file_limit(needed: int) -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit when below ``needed``; (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def timed_probes(client: httpx.Client, probes: int, segments: int, image: bytes) -> dict[str, object]:
    """Latencies (ms) of sequential /healthz and /segment requests, and their statuses."""
    healthz, segment, statuses = [], [], []
    for _ in range(probes):
        start = time.perf_counter()
        statuses.append(client.get("/healthz").status_code)
        healthz.append((time.perf_counter() - start) * 1000)
    for _ in range(segments):
        start = time.perf_counter()
        answer = client.post("/segment", files={"image": ("x.png", image, "image/png")},
                             data={"concepts": "red circle,blue star"})
        statuses.append(answer.status_code)
        segment.append((time.perf_counter() - start) * 1000)
    return {"healthz_ms": latency_summary(healthz), "segment_ms": latency_summary(segment),
            "non_200": sum(status != 200 for status in statuses)}


def probe_until(client: httpx.Client, done: threading.Event, image: bytes, every: int = 5) -> dict[str, object]:
    """/healthz in a loop (0.1 s apart) with a /segment every ``every``-th round, until ``done`` is set."""
    healthz, later, segment, statuses = [], [], [], []
    rounds, began, worst = 0, time.perf_counter(), (0.0, 0.0)
    while not done.is_set():
        start = time.perf_counter()
        statuses.append(client.get("/healthz").status_code)
        healthz.append((time.perf_counter() - start) * 1000)
        worst = max(worst, (healthz[-1], start - began))
        if start - began > 1.0:
            later.append(healthz[-1])
        if rounds % every == 0:
            start = time.perf_counter()
            answer = client.post("/segment", files={"image": ("x.png", image, "image/png")},
                                 data={"concepts": "red circle,blue star"})
            statuses.append(answer.status_code)
            segment.append((time.perf_counter() - start) * 1000)
        rounds += 1
        done.wait(0.1)
    return {"healthz_ms": latency_summary(healthz), "healthz_ms_after_first_s": latency_summary(later),
            "segment_ms": latency_summary(segment), "healthz_n": len(healthz),
            "slowest_healthz_at_s": round(worst[1], 2),
            "segment_n": len(segment), "non_200": sum(status != 200 for status in statuses)}


def open_stalled(port: int, count: int) -> tuple[list[socket.socket], dict[int, float]]:
    """``count`` connections, each with a stalled upload sent; (sockets, fileno -> time of the last byte sent)."""
    sockets, sent_at = [], {}
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(STALLED_HEAD + STALLED_BODY)
        sock.setblocking(False)
        sockets.append(sock)
        sent_at[sock.fileno()] = time.perf_counter()
    return sockets, sent_at


def watch_until_closed(sockets: list[socket.socket], sent_at: dict[int, float], limit_s: float
                       ) -> dict[str, object]:
    """Read every socket until the service closes it (or ``limit_s`` passes); close times and answers."""
    selector = selectors.DefaultSelector()
    answers: dict[int, bytes] = {}
    for sock in sockets:
        selector.register(sock, selectors.EVENT_READ)
        answers[sock.fileno()] = b""
    closed_after: list[float] = []
    reset = 0
    deadline = time.perf_counter() + limit_s
    while selector.get_map() and time.perf_counter() < deadline:
        for key, _ in selector.select(timeout=0.5):
            sock = key.fileobj
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                data, reset = b"", reset + 1
            if data:
                answers[sock.fileno()] += data
                continue
            closed_after.append(time.perf_counter() - sent_at[sock.fileno()])
            selector.unregister(sock)
    still_open = len(selector.get_map())
    statuses: dict[str, int] = {}
    for answer in answers.values():
        status = answer[9:12].decode(errors="replace") if answer.startswith(b"HTTP/1.1 ") else "none"
        if status == "408" and b'"type": "request_timeout"' not in answer:
            status = "408-without-json-type"
        statuses[status] = statuses.get(status, 0) + 1
    return {"closed": len(closed_after), "still_open": still_open, "reset": reset, "answers": statuses,
            "closed_after_s": (latency_summary(closed_after) | {"min": round(min(closed_after), 2)}
                               if closed_after else {})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="weights/zutis-shapes.safetensors")
    parser.add_argument("--connections", type=int, default=1500)
    parser.add_argument("--probes", type=int, default=50, help="sequential /healthz requests per phase")
    parser.add_argument("--segments", type=int, default=10, help="sequential /segment requests per phase")
    parser.add_argument("--idle-timeout-s", type=float, default=None,
                        help="ZUTIS_BODY_IDLE_TIMEOUT_S for the service (default: the service's default, 10 s)")
    parser.add_argument("--out", type=Path, help="also write the report here (JSON)")
    parser.add_argument("--service-log", type=Path, default=Path("/tmp/slow_upload_service.log"))
    args = parser.parse_args()

    soft, hard = raise_open_file_limit(2 * args.connections + 256)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    idle_s = args.idle_timeout_s if args.idle_timeout_s is not None else 10.0
    service = start_service(args.checkpoint, port, args.service_log,
                            extra_env={"MALLOC_TRIM_THRESHOLD_": "1073741824", "OMP_WAIT_POLICY": "PASSIVE"},
                            log_level="warning", body_idle_timeout_s=args.idle_timeout_s)
    try:
        wait_ready(base, service, 180, args.service_log)
        image = example_png((128, 128))
        with httpx.Client(base_url=base, timeout=60) as client:
            info = client.get("/info").json()
            timed_probes(client, 5, 2, image)  # warm the connection and the text cache
            rss_before = rss_mb(service.pid)
            baseline = timed_probes(client, args.probes, args.segments, image)
            done = threading.Event()
            during: dict[str, object] = {}
            opened = time.perf_counter()
            sockets, sent_at = open_stalled(port, args.connections)
            open_s = time.perf_counter() - opened
            with httpx.Client(base_url=base, timeout=60) as prober:
                thread = threading.Thread(target=lambda: during.update(probe_until(prober, done, image)))
                thread.start()  # probes from the attack's start until every stalled upload is closed
                time.sleep(1.0)
                rss_during = rss_mb(service.pid)
                closing = watch_until_closed(sockets, sent_at, limit_s=idle_s + 60)
                done.set()
                thread.join(120)
            for sock in sockets:
                sock.close()
            after = timed_probes(client, 5, 2, image)
        report = {
            "connections": args.connections, "open_file_limit": [soft, hard],
            "body_idle_timeout_s": info["limits"].get("body_idle_timeout_s"),
            "max_connections": info["limits"].get("max_connections"),
            "seconds_to_open_all": round(open_s, 2),
            "baseline": baseline, "during_attack": during, "after": after, "stalled": closing,
            "rss_mb": {"before": round(rss_before, 1), "during": round(rss_during, 1)},
            "load_average": os.getloadavg()[0],
        }
        print(f"{args.connections} stalled uploads (idle timeout {report['body_idle_timeout_s']} s): "
              f"closed {closing['closed']}, still open {closing['still_open']}, answers {closing['answers']}, "
              f"closed after {closing['closed_after_s']} s")
        print(f"/healthz ms  baseline {baseline['healthz_ms']}  during {during['healthz_ms']} (slowest at "
              f"{during['slowest_healthz_at_s']} s; after the first second {during['healthz_ms_after_first_s']})")
        print(f"/segment ms  baseline {baseline['segment_ms']}  during {during['segment_ms']}")
        print(f"non-200 answers to the probes: baseline {baseline['non_200']}, during {during['non_200']}, "
              f"after {after['non_200']}; RSS {report['rss_mb']}")
        write_json_report(args.out, report)
    finally:
        stop(service, 60)
    return 0 if closing["still_open"] == 0 and during["non_200"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
