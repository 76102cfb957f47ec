"""Soak: minutes of mixed valid, invalid and abandoned requests against a real ``python -m service``.

Starts the service on a free port with the given checkpoint, waits until it is ready, then runs ``--clients``
closed-loop clients for ``--minutes``. Each request is drawn (seeded) from three kinds:

- valid (60%): ``POST /segment`` with an example image (resized at random), 1-4 concepts, a random semantic format;
- invalid (25%): not an image, a truncated PNG, an empty file, a PPM, NaN / out-of-range parameters, no concepts,
  a too-long concept, a JSON body, a 100 KiB header (431);
- abandoned (15%): headers and half a body then the connection closes; a whole request whose answer is never read;
  a connection closed without a byte.

Reported per minute: requests by kind, answers by status, 5xx count, p50 / p99 latency of the valid requests and
the service's RSS; overall: RSS growth after the warm-up minute, 5xx total, and p99 spread. Ends the service with
SIGTERM and reports its exit status.

    nice -n 10 python benchmarks/soak_bench.py --checkpoint weights/zutis-shapes.safetensors --minutes 10
"""

from __future__ import annotations

import argparse
import io
import os
import json
import random
import signal
import socket
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# importable once the lines above ran:
from benchmarks.fixtures import free_port, rss_mb, start_service, wait_ready  # noqa: E402
from benchmarks.reports import write_json_report  # noqa: E402

CONCEPTS = ["red circle", "blue star", "green heart", "yellow square", "purple triangle", "cat", "orange ring"]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


class Images:
    """The example images at a few sizes, PNG-encoded once."""

    def __init__(self, rng: random.Random) -> None:
        self.files: list[bytes] = []
        for path in sorted((ROOT / "examples").glob("*.png")):
            image = Image.open(path).convert("RGB")
            for size in ((128, 128), (200, 150), (96, 160), (320, 240)):
                buffer = io.BytesIO()
                image.resize(size).save(buffer, format="PNG")
                self.files.append(buffer.getvalue())
        self.rng = rng

    def pick(self) -> bytes:
        return self.rng.choice(self.files)


def multipart(fields: dict[str, str], image: bytes, boundary: str = "soakboundary") -> bytes:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
                 f"Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


class Client:
    """One closed-loop client; ``record(kind, label, seconds)`` collects what happened."""

    def __init__(self, base: str, port: int, seed: int, record: Callable[[str, str, float | None], None]) -> None:
        self.base = base
        self.port = port
        self.rng = random.Random(seed)
        self.images = Images(self.rng)
        self.record = record
        self.http = httpx.Client(base_url=base, timeout=60)

    def run(self, until: float) -> None:
        while time.monotonic() < until:
            roll = self.rng.random()
            try:
                if roll < 0.60:
                    self.valid()
                elif roll < 0.85:
                    self.invalid()
                else:
                    self.abandoned()
            except (httpx.HTTPError, OSError) as error:
                self.record("error", type(error).__name__, None)
        self.http.close()

    def _post(self, kind: str, **kwargs: Any) -> None:
        start = time.perf_counter()
        answer = self.http.post("/segment", **kwargs)
        seconds = time.perf_counter() - start
        label = str(answer.status_code)
        if answer.status_code >= 400:
            try:
                label += ":" + answer.json()["type"]
            except (ValueError, KeyError):
                label += ":not-json"
        self.record(kind, label, seconds)

    def valid(self) -> None:
        concepts = ",".join(self.rng.sample(CONCEPTS, self.rng.randint(1, 4)))
        semantic = self.rng.choice(["png", "rle", "none"])
        self._post("valid", files={"image": ("x.png", self.images.pick(), "image/png")},
                   data={"concepts": concepts, "semantic": semantic})

    def invalid(self) -> None:
        case = self.rng.randrange(9)
        good = self.images.pick()
        files = {"image": ("x.png", good, "image/png")}
        if case == 0:
            self._post("invalid", files={"image": ("x.png", b"not an image at all", "image/png")},
                       data={"concepts": "cat"})
        elif case == 1:
            self._post("invalid", files={"image": ("x.png", good[: len(good) // 3], "image/png")},
                       data={"concepts": "cat"})
        elif case == 2:
            self._post("invalid", files={"image": ("x.png", b"", "image/png")}, data={"concepts": "cat"})
        elif case == 3:
            buffer = io.BytesIO()
            Image.new("RGB", (16, 16)).save(buffer, format="PPM")
            self._post("invalid", files={"image": ("x.ppm", buffer.getvalue(), "image/x-ppm")},
                       data={"concepts": "cat"})
        elif case == 4:
            field = self.rng.choice(["score_threshold", "mask_threshold", "nms_iou"])
            self._post("invalid", files=files, data={"concepts": "cat", field: self.rng.choice(["nan", "inf", "1.5"])})
        elif case == 5:
            self._post("invalid", files=files, data={"concepts": " , "})
        elif case == 6:
            self._post("invalid", files=files, data={"concepts": "x" * 500})
        elif case == 7:
            self._post("invalid", json={"concepts": ["cat"]})
        else:
            start = time.perf_counter()
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (100 << 10) + b"\r\n\r\n")
                answer = sock.recv(100)
            self.record("invalid", answer.split(b" ", 2)[1].decode() + ":headers" if answer else "closed",
                        time.perf_counter() - start)

    def abandoned(self) -> None:
        case = self.rng.randrange(3)
        body = multipart({"concepts": "red circle"}, self.images.pick())
        head = (f"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=soakboundary\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            if case == 0:
                sock.sendall(head + body[: len(body) // 2])
                time.sleep(self.rng.uniform(0.0, 0.2))
            elif case == 1:
                sock.sendall(head + body)
                time.sleep(self.rng.uniform(0.0, 0.05))
        self.record("abandoned", ("half-body", "unread-answer", "empty")[case], None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="weights/zutis-shapes.safetensors")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the report here (JSON)")
    parser.add_argument("--service-log", type=Path, default=Path("/tmp/soak_service.log"),
                        help="the service's own log")
    args = parser.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    service = start_service(args.checkpoint, port, args.service_log, max_batch_size=args.max_batch_size,
                            log_level="warning", extra_env={"MALLOC_TRIM_THRESHOLD_": "1073741824",
                                                            "OMP_WAIT_POLICY": "PASSIVE"})
    try:
        wait_ready(base, service, 180, args.service_log)
        print(f"ready; RSS {rss_mb(service.pid):.1f} MB; soaking for {args.minutes:g} min with {args.clients} clients",
              flush=True)

        start = time.monotonic()
        until = start + args.minutes * 60
        lock = threading.Lock()
        kinds: dict[int, Counter] = defaultdict(Counter)
        labels: dict[int, Counter] = defaultdict(Counter)
        latencies: dict[int, list[float]] = defaultdict(list)
        rss: dict[int, float] = {}
        load: dict[int, float] = {}  # the machine's 1-minute load average: context for the latencies

        def record(kind: str, label: str, seconds: float | None) -> None:
            minute = int((time.monotonic() - start) // 60)
            with lock:
                kinds[minute][kind] += 1
                labels[minute][f"{kind} {label}"] += 1
                if kind == "valid" and seconds is not None and label == "200":
                    latencies[minute].append(seconds)

        clients = [Client(base, port, args.seed * 100 + k, record) for k in range(args.clients)]
        threads = [threading.Thread(target=c.run, args=(until,)) for c in clients]
        for thread in threads:
            thread.start()
        while time.monotonic() < until:
            minute = int((time.monotonic() - start) // 60)
            rss[minute] = rss_mb(service.pid)
            load[minute] = os.getloadavg()[0]
            time.sleep(2.0)
        for thread in threads:
            thread.join(120)
        rss[int(args.minutes) - 1 if args.minutes >= 1 else 0] = rss_mb(service.pid)

        service.send_signal(signal.SIGTERM)
        exit_status = service.wait(60)
    finally:
        if service.poll() is None:
            service.kill()

    minutes = []
    for minute in sorted(kinds):
        if minute >= args.minutes:
            continue
        statuses = Counter({label: n for label, n in labels[minute].items()})
        fivexx = sum(n for label, n in statuses.items() if " 5" in label)
        minutes.append({"minute": minute + 1, "requests": dict(kinds[minute]), "answers": dict(sorted(statuses.items())),
                        "5xx": fivexx, "valid_p50_ms": percentile(latencies[minute], 0.5),
                        "valid_p99_ms": percentile(latencies[minute], 0.99), "rss_mb": round(rss.get(minute, 0.0), 1),
                        "load_average": load.get(minute)})
    p99s = [m["valid_p99_ms"] for m in minutes[1:] if m["valid_p99_ms"] is not None]
    report = {
        "minutes": minutes,
        "rss_mb_after_warmup": minutes[0]["rss_mb"] if minutes else None,
        "rss_mb_end": minutes[-1]["rss_mb"] if minutes else None,
        "rss_growth_mb": round(minutes[-1]["rss_mb"] - minutes[0]["rss_mb"], 1) if minutes else None,
        "requests": sum(sum(m["requests"].values()) for m in minutes),
        "5xx": sum(m["5xx"] for m in minutes),
        "p99_ms_min_max_after_first_minute": [min(p99s), max(p99s)] if p99s else None,
        "exit_status": exit_status,
    }
    for m in minutes:
        print(f"minute {m['minute']:>2}: {sum(m['requests'].values()):>5} requests {m['requests']}, 5xx {m['5xx']}, "
              f"valid p50 {m['valid_p50_ms']} ms p99 {m['valid_p99_ms']} ms, RSS {m['rss_mb']} MB, "
              f"load {m['load_average']}", flush=True)
    print(json.dumps({k: v for k, v in report.items() if k != "minutes"}), flush=True)
    write_json_report(args.out, report, announce=False)
    return 0 if report["5xx"] == 0 and exit_status == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
