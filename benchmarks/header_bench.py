"""Huge request heads against the service under each HTTP protocol: does one client's header stall the others?

For each protocol the service's app (real checkpoint, loaded and warm) is served by uvicorn in a child process;
``--attackers`` client processes then each send a 64 MB header line every ``--interval`` seconds (or back to back
when an answer takes longer) for ``--seconds``, while this process measures ``GET /healthz`` latency. Reported per protocol: /healthz p50 / p99 / max before and during the attack; the
server's event-loop lag (how late a 5 ms timer fires in the server: the stall every other request sees, free of
the client side's CPU contention) p50 / p99 / max during the attack; what the attackers got (status, seconds to
the answer); and the server's RSS before and at its peak.

Protocols: ``bounded`` (service.protocol: httptools with a 64 KiB head limit, what ``python -m service`` runs),
``httptools`` (uvicorn's default, no limit), ``h11`` (uvicorn's h11 with its default 16 KiB incomplete-event
limit), ``h11-64k`` (h11 with ``h11_max_incomplete_event_size=65536``).

    nice -n 10 python benchmarks/header_bench.py --checkpoint weights/zutis-shapes.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# importable once the lines above ran:
from benchmarks.fixtures import free_port, rss_mb, service_env, stop, wait_ready  # noqa: E402
from benchmarks.reports import write_json_report  # noqa: E402

PROTOCOLS = ("bounded", "httptools", "h11", "h11-64k")


def serve(protocol: str, port: int, lag_file: Path) -> None:
    """Child process: the service's app under uvicorn with ``protocol``; event-loop lag samples (monotonic time,
    seconds late) appended to ``lag_file`` twice a second."""
    import asyncio

    import uvicorn

    from service.app import create_app
    from service.protocol import ConnectionLimits, guarded_protocol
    from service.settings import Settings

    settings = Settings()
    app = create_app(settings)
    options: dict = {"http": {"bounded": guarded_protocol(ConnectionLimits.from_settings(settings)),
                              "httptools": "httptools", "h11": "h11", "h11-64k": "h11"}[protocol]}
    if protocol == "h11-64k":
        options["h11_max_incomplete_event_size"] = 65536
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", **options))

    async def watch_lag() -> None:
        samples: list[str] = []
        last_write = time.monotonic()
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.005)
            now = time.monotonic()
            samples.append(f"{now:.4f} {now - before - 0.005:.5f}\n")
            if now - last_write > 0.5:
                with open(lag_file, "a") as out:
                    out.writelines(samples)
                samples.clear()
                last_write = now

    async def main() -> None:
        watcher = asyncio.create_task(watch_lag())
        await server.serve()
        watcher.cancel()

    asyncio.run(main())


def attack_once(port: int, size: int) -> tuple[str, float]:
    """Send a ``size``-byte header line; return the status line (or the error) and the seconds to it."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
    start = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            try:
                sock.sendall(head)
                chunk = b"a" * (1 << 20)
                for _ in range(size // len(chunk)):
                    sock.sendall(chunk)
                sock.sendall(b"\r\n\r\n")
            except OSError:
                pass  # the server stopped reading: its answer may be waiting
            answer = sock.recv(200)
        status = answer.split(b"\r\n", 1)[0].decode(errors="replace") or "closed without an answer"
    except OSError as error:
        status = type(error).__name__
    return status, time.perf_counter() - start


def attack(port: int, size: int, seconds: float, interval: float, out: Path) -> None:
    """Attacker process: ``attack_once`` every ``interval`` s until ``seconds`` have passed; results to ``out``."""
    end = time.monotonic() + seconds
    results = []
    while time.monotonic() < end:
        began = time.monotonic()
        results.append(attack_once(port, size))
        time.sleep(max(0.0, interval - (time.monotonic() - began)))
    out.write_text(json.dumps(results))


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"n": len(ordered), "p50_ms": round(pick(0.5) * 1000, 2), "p99_ms": round(pick(0.99) * 1000, 2),
            "max_ms": round(ordered[-1] * 1000, 2)}


def probe(base: str, stop: threading.Event, seconds: float, out: list[float]) -> None:
    with httpx.Client(base_url=base, timeout=60) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not stop.is_set():
            start = time.perf_counter()
            client.get("/healthz")
            out.append(time.perf_counter() - start)
            time.sleep(0.02)


def run(protocol: str, checkpoint: str, attackers: int, seconds: float, size: int, interval: float) -> dict:
    port = free_port()
    env = service_env(checkpoint, port, device="cpu", max_batch_size=1, torch_threads=1)
    lag_file = Path(f"/tmp/header_bench_lag_{os.getpid()}_{protocol}.txt")
    lag_file.unlink(missing_ok=True)
    process = subprocess.Popen([sys.executable, __file__, "--serve", protocol, "--port", str(port), "--out",
                                str(lag_file)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process, 120, poll_s=0.2)
        rss_before = rss_mb(process.pid)
        quiet: list[float] = []
        probe(base, threading.Event(), 3.0, quiet)

        attackers_out = [Path(f"/tmp/header_bench_{os.getpid()}_{k}.json") for k in range(attackers)]
        procs = [subprocess.Popen([sys.executable, __file__, "--attack", str(port), "--size", str(size),
                                   "--seconds", str(seconds + 0.5), "--interval", str(interval),
                                   "--out", str(out)]) for out in attackers_out]
        time.sleep(0.5)
        loaded: list[float] = []
        rss_peak = rss_before
        attack_start = time.monotonic()
        prober = threading.Thread(target=probe, args=(base, threading.Event(), seconds, loaded))
        prober.start()
        while prober.is_alive():
            rss_peak = max(rss_peak, rss_mb(process.pid))
            time.sleep(0.1)
        attack_end = time.monotonic()
        results: list[tuple[str, float]] = []
        for proc, out in zip(procs, attackers_out):
            proc.wait(300)
            results += [tuple(r) for r in json.loads(out.read_text())]
            out.unlink()
        statuses: dict[str, int] = {}
        for status, _ in results:
            statuses[status] = statuses.get(status, 0) + 1
        time.sleep(1.0)  # the last lag samples reach the file
        lags = [float(lag) for t, lag in (line.split() for line in lag_file.read_text().splitlines())
                if attack_start <= float(t) <= attack_end]
        lag_file.unlink()
        return {"protocol": protocol, "healthz_quiet": percentiles(quiet), "healthz_under_attack": percentiles(loaded),
                "loop_lag_under_attack": percentiles(lags),
                "attacks": len(results), "attack_answers": statuses,
                "attack_seconds_p50": round(statistics.median(s for _, s in results), 3) if results else None,
                "rss_mb_before": round(rss_before, 1), "rss_mb_peak": round(rss_peak, 1)}
    finally:
        stop(process, 30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="weights/zutis-shapes.safetensors")
    parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    parser.add_argument("--attackers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--header-mb", type=int, default=64)
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between one attacker's attacks")
    parser.add_argument("--out", type=Path, help="also write the results here (JSON)")
    parser.add_argument("--serve", choices=PROTOCOLS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--attack", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attack:
        attack(args.attack, args.size, args.seconds, args.interval, args.out)
        return 0
    if args.serve:
        serve(args.serve, args.port, args.out)
        return 0
    reports = []
    for protocol in args.protocols:
        report = run(protocol, args.checkpoint, args.attackers, args.seconds, args.header_mb << 20, args.interval)
        print(json.dumps(report), flush=True)
        reports.append(report)
    write_json_report(args.out, reports, announce=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
