"""Load benchmark: the HTTP service under N concurrent clients vs the predictor's own in-process throughput.

Starts ``python -m service`` on loopback (or targets ``--url``), drives ``POST /segment`` with N closed-loop clients
(mixed vocabularies, JPEG uploads), and reports throughput, p50/p95/p99 latency and the mean batch size (from
/metrics). In the same run it times the predictor in this process through the same steps (decode, letterbox,
forward at the service's mean batch size, post-processing, JSON) and reports service/in-process throughput, and
single-client p50 latency vs the in-process single-image time. A script, not a test.

    MALLOC_MMAP_THRESHOLD_=33554432 .venv/bin/python benchmarks/load_bench.py --make-checkpoint \\
        --checkpoint runs/bench/vit-b16-random.safetensors --clients 4 --max-batch-size 4 --requests 24

On a CPU shared with other processes, OpenMP's default of spinning while it waits makes one process's forward
pass several times slower than another's depending on how many threads happen to use OpenMP (libgomp spins
less once it manages more threads than there are cores; the service has several such threads, a one-thread
loop has one). ``--omp-wait-policy PASSIVE`` (the default) sets ``OMP_WAIT_POLICY`` for both sides alike so that the
comparison measures the service, not that.

``--make-checkpoint`` writes a randomly initialised ViT-B-16 (quickgelu) ZUTIS checkpoint with input size 384
when the file does not exist (``runs/`` is git-ignored). Random weights cost the same time as trained ones.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# importable once the lines above ran:
from benchmarks.fixtures import (blob_jpeg, random_checkpoint, start_service, stop, vit_b16_config,  # noqa: E402
                                 wait_ready)

VOCABULARIES = [
    ["cat", "dog"],
    ["person", "bicycle", "car", "traffic light"],
    ["red circle", "blue star", "green square"],
    ["cup", "bottle", "chair", "table", "laptop", "book"],
]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def batch_stats(url: str) -> tuple[float, float]:
    """(sum, count) of zutis_batch_size from /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        if family.name == "zutis_batch_size":
            values = {s.name: s.value for s in family.samples}
            return values["zutis_batch_size_sum"], values["zutis_batch_size_count"]
    raise RuntimeError("zutis_batch_size not found in /metrics")


def drive(url: str, images: list[bytes], clients: int, total: int) -> tuple[list[float], float]:
    """``clients`` closed-loop clients sending ``total`` requests in all; (latencies in s, wall time in s)."""
    import httpx

    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(total))
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(timeout=3600) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                files = {"image": (f"{i}.jpg", images[i % len(images)], "image/jpeg")}
                data = {"concepts": ",".join(VOCABULARIES[i % len(VOCABULARIES)]), "semantic": "png"}
                start = time.perf_counter()
                answer = http.post(f"{url}/segment", files=files, data=data)
                elapsed = time.perf_counter() - start
                with lock:
                    if answer.status_code != 200:
                        errors.append(f"{answer.status_code} {answer.text[:200]}")
                    latencies.append(elapsed)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} request(s) failed, e.g. {errors[0]}")
    return latencies, wall


class InProcess:
    """The predictor in this process, through the same steps as the service: decode, letterbox, forward, cached
    text embeddings, post-processing, JSON."""

    def __init__(self, args: argparse.Namespace, images: list[bytes]) -> None:
        import torch

        from model.embedding_cache import TextEmbeddingCache
        from model.predictor import Predictor

        torch.set_flush_denormal(True)
        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        self.images = images
        self.predictor = Predictor.from_checkpoint(args.checkpoint, args.device, "auto")
        self.cache = TextEmbeddingCache()
        self.params = self.predictor.params()

    def run(self, indices: list[int]) -> None:
        """One batch: the images ``indices`` (mod the image count) with their vocabularies."""
        from PIL import Image

        from service.schema import build_response

        p = self.predictor
        prepared = [p.prepare(Image.open(io.BytesIO(self.images[i % len(self.images)])).convert("RGB"))
                    for i in indices]
        output = p.forward(prepared)
        for k, i in enumerate(indices):
            vocabulary, text = p.encode_concepts(VOCABULARIES[i % len(VOCABULARIES)], self.cache)
            prediction = p.postprocess(output, k, prepared[k], vocabulary, text, self.params)
            build_response(prediction, p.model_id, "png").model_dump_json()

    def throughput(self, batch_size: int, total: int) -> tuple[int, float]:
        """(images, seconds) for ``total`` images in batches of ``batch_size``."""
        start = time.perf_counter()
        for first in range(0, total, batch_size):
            self.run(list(range(first, min(first + batch_size, total))))
        return total, time.perf_counter() - start

    def single(self, index: int) -> float:
        start = time.perf_counter()
        self.run([index])
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=REPO_ROOT / "runs/bench/vit-b16-random.safetensors")
    parser.add_argument("--make-checkpoint", action="store_true", help="write a random ViT-B-16 checkpoint if absent")
    parser.add_argument("--url", help="target this running service instead of starting one")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=24, help="requests per round of the concurrent phase")
    parser.add_argument("--rounds", type=int, default=2, help="alternating service / in-process phases")
    parser.add_argument("--single", type=int, default=6, help="sequential requests of the single-client phase")
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--max-batch-delay-ms", type=float, default=5.0)
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default in both processes")
    parser.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "default"],
                        help="OMP_WAIT_POLICY of both the service and this process (default: PASSIVE)")
    parser.add_argument("--image-size", default="480x640", help="HxW of the uploaded JPEGs")
    parser.add_argument("--json-out", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.omp_wait_policy != "default":
        if "torch" in sys.modules:
            parser.error("--omp-wait-policy must be applied before torch is imported")
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # read by libgomp when torch loads; inherited below

    if not args.checkpoint.is_file():
        if not args.make_checkpoint:
            parser.error(f"checkpoint file not found: {args.checkpoint} (add --make-checkpoint to create one)")
        print(f"writing a random ViT-B-16 checkpoint to {args.checkpoint} ...", flush=True)
        random_checkpoint(args.checkpoint, vit_b16_config(384), model_id="random-vit-b16",
                          made_by="benchmarks/load_bench.py")
    height, width = (int(v) for v in args.image_size.lower().split("x"))
    images = [blob_jpeg(height, width, seed) for seed in range(8)]
    load_before = os.getloadavg()

    url = args.url or f"http://127.0.0.1:{args.port}"
    log_path = REPO_ROOT / "runs" / "bench" / "service.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    process = None if args.url else start_service(
        args.checkpoint, args.port, log_path, device=args.device, max_batch_size=args.max_batch_size,
        max_batch_delay_ms=args.max_batch_delay_ms, request_timeout_s=3600, log_level="warning",
        torch_threads=args.torch_threads or None)
    # The two sides alternate (service phase, then in-process phase, per round; single requests in pairs), so
    # that load from other processes on a shared machine falls on both alike.
    service_images = service_seconds = local_images = local_seconds = 0.0
    latencies: list[float] = []
    batch_sums = [0.0, 0.0]
    single_service: list[float] = []
    single_local: list[float] = []
    try:
        t0 = time.perf_counter()
        wait_ready(url, process, 3600, log_path)
        print(f"service ready after {time.perf_counter() - t0:.0f} s (load + warm-up)", flush=True)
        local = InProcess(args, images)
        drive(url, images, args.clients, args.clients)  # text embeddings cached, every path touched once
        local.run(list(range(args.max_batch_size)))
        local.run([0])
        for round_ in range(args.rounds):
            before = batch_stats(url)
            round_latencies, wall = drive(url, images, args.clients, args.requests)
            after = batch_stats(url)
            latencies += round_latencies
            service_images += args.requests
            service_seconds += wall
            batch_sums = [batch_sums[0] + after[0] - before[0], batch_sums[1] + after[1] - before[1]]
            round_batch = (after[0] - before[0]) / max(after[1] - before[1], 1)
            count, seconds = local.throughput(max(1, round(round_batch)), args.requests)
            local_images += count
            local_seconds += seconds
            print(f"round {round_ + 1}: service {args.requests / wall:.3f} img/s at mean batch {round_batch:.2f}, "
                  f"in-process {count / seconds:.3f} img/s", flush=True)
        for i in range(args.single):
            single_service += drive(url, images, 1, 1)[0]
            single_local.append(local.single(i))
    finally:
        if process is not None:
            stop(process, 120)

    mean_batch = batch_sums[0] / max(batch_sums[1], 1)
    batch = max(1, round(mean_batch))
    throughput = service_images / service_seconds
    local_throughput = local_images / local_seconds
    results = {
        "clients": args.clients, "requests_per_round": args.requests, "rounds": args.rounds,
        "max_batch_size": args.max_batch_size, "max_batch_delay_ms": args.max_batch_delay_ms,
        "image_hw": [height, width],
        "service_throughput_img_s": throughput, "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95), "latency_p99_s": percentile(latencies, 99),
        "mean_batch_size": mean_batch, "in_process_batch_size": batch,
        "in_process_throughput_img_s": local_throughput, "throughput_ratio": throughput / local_throughput,
        "single_client_p50_s": statistics.median(single_service),
        "in_process_single_p50_s": statistics.median(single_local),
        "single_ratio": statistics.median(single_service) / statistics.median(single_local),
        "torch_threads": args.torch_threads or "default", "omp_wait_policy": args.omp_wait_policy,
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "cpus": os.cpu_count(),
    }
    print(json.dumps(results, indent=2))
    print(f"\nservice {throughput:.3f} img/s vs in-process {local_throughput:.3f} img/s at batch {batch}: "
          f"ratio {results['throughput_ratio']:.3f}; latency p50/p95/p99 {results['latency_p50_s']:.2f}/"
          f"{results['latency_p95_s']:.2f}/{results['latency_p99_s']:.2f} s; single-client p50 "
          f"{results['single_client_p50_s']:.2f} s vs in-process {results['in_process_single_p50_s']:.2f} s "
          f"(x{results['single_ratio']:.3f})")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
