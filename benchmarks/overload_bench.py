"""Overload against a real ``python -m service``: bursts of concurrent uploads far beyond what it holds.

Starts the service with a small queue (``--queue-size``, default 16) and connection cap (``--max-connections``,
default 100), then sends ``--rounds`` bursts of ``--burst`` concurrent ``POST /segment`` requests (each on its own
connection), while ``/healthz`` is probed every 50 ms on a connection opened beforehand. Reported: the answers by
status and type (expected: 200, 503 ``queue_full`` and 503 ``too_many_connections``, nothing else: no 500, no
connection error, no timeout), how fast each kind was answered, and /healthz latency before and during.

    nice -n 10 python benchmarks/overload_bench.py --burst 300 --rounds 3 --out /tmp/overload.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.fixtures import example_png, free_port, rss_mb, start_service, stop, wait_ready  # noqa: E402 (importable once the line above ran)
from benchmarks.reports import latency_summary, write_json_report  # noqa: E402


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    return {"n": len(seconds), **latency_summary(seconds, scale=1000, digits=1)} if seconds else {}


async def burst(base: str, count: int, image: bytes) -> list[tuple[str, float]]:
    """``count`` concurrent uploads, each on a fresh connection (one client, no keep-alive: building a client
    per request cost the benchmark more CPU than the service spent answering); (label, seconds) per request."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        return list(await asyncio.gather(*(upload(client, image) for _ in range(count))))


async def upload(client: httpx.AsyncClient, image: bytes) -> tuple[str, float]:
    """One ``POST /segment``: its label (status, and the error type) and how long it took."""
    start = time.perf_counter()
    try:
        answer = await client.post("/segment", files={"image": ("x.png", image, "image/png")},
                                   data={"concepts": "red circle,blue star"})
        label = str(answer.status_code)
        if answer.status_code != 200:
            try:
                label += ":" + answer.json()["type"]
            except (ValueError, KeyError):
                label += ":not-json"
    except httpx.HTTPError as error:
        label = f"error:{type(error).__name__}"
    return label, time.perf_counter() - start


def probe(base: str, done: threading.Event, latencies: list[float], failures: list[str]) -> None:
    with httpx.Client(base_url=base, timeout=30) as client:
        client.get("/healthz")
        while not done.is_set():
            start = time.perf_counter()
            try:
                status = client.get("/healthz").status_code
                if status != 200:
                    failures.append(str(status))
            except httpx.HTTPError as error:
                failures.append(type(error).__name__)
            latencies.append(time.perf_counter() - start)
            done.wait(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="weights/zutis-shapes.safetensors")
    parser.add_argument("--burst", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--queue-size", type=int, default=16)
    parser.add_argument("--max-connections", type=int, default=100)
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, help="also write the report here (JSON)")
    parser.add_argument("--service-log", type=Path, default=Path("/tmp/overload_service.log"))
    args = parser.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    service = start_service(args.checkpoint, port, args.service_log,
                            extra_env={"MALLOC_TRIM_THRESHOLD_": "1073741824", "OMP_WAIT_POLICY": "PASSIVE"},
                            log_level="warning", queue_size=args.queue_size, max_connections=args.max_connections,
                            max_batch_size=args.max_batch_size)
    try:
        wait_ready(base, service, 180, args.service_log)
        image = example_png((256, 256))
        idle: list[float] = []
        idle_failures: list[str] = []
        done = threading.Event()
        prober = threading.Thread(target=probe, args=(base, done, idle, idle_failures))
        prober.start()
        time.sleep(2.0)
        done.set()
        prober.join()

        during: list[float] = []
        failures: list[str] = []
        done = threading.Event()
        prober = threading.Thread(target=probe, args=(base, done, during, failures))
        prober.start()
        labels: Counter = Counter()
        seconds: dict[str, list[float]] = defaultdict(list)
        started = time.perf_counter()
        for _ in range(args.rounds):
            for label, took in asyncio.run(burst(base, args.burst, image)):
                labels[label] += 1
                seconds[label].append(took)
        wall = time.perf_counter() - started
        rss = rss_mb(service.pid)
        done.set()
        prober.join()
        after = httpx.post(f"{base}/segment", files={"image": ("x.png", image, "image/png")},
                           data={"concepts": "red circle"}, timeout=60).status_code
        unexpected = sum(n for label, n in labels.items()
                         if label not in ("200", "503:queue_full", "503:too_many_connections"))
        report = {
            "burst": args.burst, "rounds": args.rounds, "queue_size": args.queue_size,
            "max_connections": args.max_connections, "seconds": round(wall, 1), "answers": dict(labels),
            "unexpected": unexpected, "latency_ms": {label: percentiles_ms(v) for label, v in seconds.items()},
            "healthz_ms": {"idle": percentiles_ms(idle), "during": percentiles_ms(during)},
            "healthz_failures": failures, "segment_after": after, "rss_mb": round(rss, 1),
            "load_average": os.getloadavg()[0],
        }
        print(f"{args.rounds} bursts of {args.burst} concurrent uploads in {wall:.1f} s: {dict(labels)}; "
              f"unexpected answers {unexpected}")
        for label, v in sorted(seconds.items()):
            print(f"  {label:28s} {percentiles_ms(v)}")
        print(f"/healthz ms: idle {percentiles_ms(idle)}, during {percentiles_ms(during)}, failures {failures}")
        print(f"a request afterwards: {after}; RSS {rss:.1f} MB")
        write_json_report(args.out, report)
    finally:
        stop(service, 60)
    return 0 if unexpected == 0 and not failures and after == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
