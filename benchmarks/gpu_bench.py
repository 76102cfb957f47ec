"""GPU benchmark: images/s and p50/p99 latency of ZUTIS ViT-B/16 at 384 and 640 px, batch sizes 1 to 32,
float16 and bfloat16, letterbox and native geometry, in-process and through the service; one JSON file.

In-process, per (input size, dtype, geometry, batch size): a batch of decoded COCO-sized images (a fixed mix of
COCO's common sizes, prepared once) goes ``--iterations`` times through the predictor; each pass is timed as
``forward`` alone (synchronised) and ``end_to_end`` (forward, then every image's post-processing on the GPU, RLE
and JSON on the CPU). Reported: images/s over the timed passes, p50/p99 of the per-pass latency, the padded
fraction of the pass's input.

Through the service, per (input size, dtype, geometry, ``--service-batch-sizes``): ``python -m service`` on
loopback with ``ZUTIS_MAX_BATCH_SIZE`` = the batch size, driven by ``2 x batch size`` closed-loop clients
uploading the same images as JPEGs; reported: images/s, p50/p99 request latency, mean batch size.

The checkpoint is a random ViT-B-16 (quickgelu) ZUTIS per input size (random weights cost the same time as
trained ones), written under ``runs/bench/`` if absent.

    .venv/bin/python benchmarks/gpu_bench.py --json-out runs/bench/gpu.json          # the full grid, on CUDA
    .venv/bin/python benchmarks/gpu_bench.py --dry-run --device cpu --json-out /tmp/gpu-dry.json

``--dry-run`` runs every piece of the script on a tiny random model (64 px, batch sizes 1-2, float32 on CPU,
float16/bfloat16 on CUDA, two iterations, one short service run per geometry): it checks the script, its figures
mean nothing. The full grid has not been run in this project yet (no GPU was available; README, "Benchmarks").
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.geometry_bench import coco_like_jpegs  # noqa: E402
from benchmarks.live import stop, wait_ready  # noqa: E402
from benchmarks.load_bench import drive  # noqa: E402

CONCEPTS = ["person", "car", "chair", "dog", "cup"]


def percentiles(values: list[float]) -> dict[str, float]:
    """p50 and p99 (milliseconds) of latencies in seconds."""
    arr = np.asarray(values, dtype=np.float64) * 1000.0
    return {"p50_ms": round(float(np.percentile(arr, 50)), 3), "p99_ms": round(float(np.percentile(arr, 99)), 3)}


def make_checkpoint(path: Path, input_size: int, tiny: bool) -> Path:
    """A random ViT-B-16 ZUTIS checkpoint (or the tiny test model) with ``input_size``, written if absent."""
    if path.is_file():
        return path
    import torch

    from model.checkpoint import CheckpointMetadata, save_checkpoint
    from model.config import ModelConfig, tiny_test_config
    from model.network import ZUTIS
    from model.text import TextEncoder

    torch.manual_seed(0)
    config = tiny_test_config(input_size=input_size) if tiny else ModelConfig(clip_model="ViT-B-16-quickgelu",
                                                                              input_size=input_size)
    model, text = ZUTIS(config), TextEncoder(config)
    metadata = CheckpointMetadata(model_id="random-tiny" if tiny else "random-vit-b16", model_config=config,
                                  vocabulary=["background", "cat", "dog"],
                                  provenance={"made_by": "benchmarks/gpu_bench.py", "weights": "random"})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model, text.tower, metadata)
    return path


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_in_process(loaded: Any, device: str, dtype: str, geometry: str, input_size: int,
                     batch_size: int, images: list[Any], iterations: int, warmup: int) -> dict[str, Any]:
    """Timed passes of one batch through the predictor: forward alone and forward + post-processing + JSON.

    ``loaded``: the ``LoadedCheckpoint`` (read once per input size; the predictors share its modules in turn).
    """
    from model.predictor import Predictor, resolve_device, resolve_dtype
    from service.schema import build_response

    dev = resolve_device(device)
    predictor = Predictor(loaded, dev, resolve_dtype(dtype, dev), input_size, geometry)
    prepared = [predictor.prepare(images[i % len(images)]) for i in range(batch_size)]
    vocabulary, text = predictor.encode_concepts(CONCEPTS)
    params = predictor.params()
    forward_s, total_s = [], []
    for i in range(warmup + iterations):
        synchronize(device)
        start = time.perf_counter()
        output = predictor.forward(prepared)
        synchronize(device)
        forwarded = time.perf_counter()
        for index, p in enumerate(prepared):
            prediction = predictor.postprocess(output, index, p, vocabulary, text, params)
            build_response(prediction, predictor.model_id, "png").model_dump_json()
        done = time.perf_counter()
        if i >= warmup:
            forward_s.append(forwarded - start)
            total_s.append(done - start)
    result: dict[str, Any] = {"batch_size": batch_size, "iterations": iterations,
                              "padded_fraction": round(predictor.padded_fraction(prepared), 4),
                              "tokens_per_image": round(sum(predictor.sequence_length(p) for p in prepared)
                                                        / batch_size, 1)}
    for name, times in (("forward", forward_s), ("end_to_end", total_s)):
        result[name] = {"images_per_s": round(batch_size * len(times) / sum(times), 3), **percentiles(times)}
    del output
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    return result


def bench_service(checkpoint: Path, device: str, dtype: str, geometry: str, input_size: int, batch_size: int,
                  jpegs: list[bytes], requests: int, port: int, log_path: Path) -> dict[str, Any]:
    """The HTTP service with ``ZUTIS_MAX_BATCH_SIZE=batch_size`` under ``2 x batch_size`` closed-loop clients."""
    from benchmarks.load_bench import batch_stats

    # ZUTIS_CACHE_DIR passes (where OpenVINO exports go on a CPU); every other setting is the run's own
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZUTIS_") or k == "ZUTIS_CACHE_DIR"}
    env.update(ZUTIS_CHECKPOINT=str(checkpoint), ZUTIS_DEVICE=device, ZUTIS_DTYPE=dtype, ZUTIS_GEOMETRY=geometry,
               ZUTIS_INPUT_SIZE=str(input_size), ZUTIS_HOST="127.0.0.1", ZUTIS_PORT=str(port),
               ZUTIS_MAX_BATCH_SIZE=str(batch_size), ZUTIS_MAX_BATCH_DELAY_MS="5",
               ZUTIS_QUEUE_SIZE=str(max(64, 4 * batch_size)), ZUTIS_REQUEST_TIMEOUT_S="600",
               ZUTIS_LOG_LEVEL="warning")
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "33554432")
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "service"], stdout=log, stderr=subprocess.STDOUT,
                                   env=env, cwd=REPO_ROOT)
        try:
            wait_ready(url, process, 600, log_path)
            clients = max(2, 2 * batch_size)
            drive(url, jpegs, clients, clients)  # warm-up round, not counted
            before = batch_stats(url)
            latencies, wall = drive(url, jpegs, clients, requests)
            after = batch_stats(url)
        finally:
            stop(process, 60)
    batches = after[1] - before[1]
    return {"batch_size": batch_size, "clients": clients, "requests": requests,
            "images_per_s": round(requests / wall, 3), **percentiles(latencies),
            "mean_batch_size": round((after[0] - before[0]) / batches, 2) if batches else None}


def environment(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                            "cpu_cores": os.cpu_count(), "device": device}
    if device.startswith("cuda"):
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                            text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="tiny model, tiny grid: checks the script only")
    parser.add_argument("--sizes", type=parse_ints, default=[384, 640], help="input sizes (letterbox S = cap)")
    parser.add_argument("--batch-sizes", type=parse_ints, default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--dtypes", type=parse_names, default=["float16", "bfloat16"])
    parser.add_argument("--geometries", type=parse_names, default=["letterbox", "native"])
    parser.add_argument("--iterations", type=int, default=20, help="timed passes per in-process configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--service-batch-sizes", type=parse_ints, default=[1, 8, 32],
                        help="ZUTIS_MAX_BATCH_SIZE values of the service runs (empty: no service runs)")
    parser.add_argument("--service-requests", type=int, default=0, help="requests per service run "
                        "(default: max(64, 8 x batch size))")
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--images", type=int, default=16, help="distinct COCO-sized images in the mix")
    parser.add_argument("--json-out", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "runs" / "bench",
                        help="where the random checkpoints and the service log go")
    args = parser.parse_args(argv)

    import torch
    from PIL import Image

    from model.checkpoint import load_checkpoint

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available (use --dry-run --device cpu to check the script)")
    if args.dry_run:
        args.sizes, args.batch_sizes, args.iterations, args.warmup = [64], [1, 2], 2, 1
        args.service_batch_sizes = [2] if args.service_batch_sizes else []
        args.service_requests, args.images = 4, 4
        if args.device == "cpu":
            args.dtypes = ["float32"]  # the predictor runs float32 only on CPU
    runs = args.work_dir
    jpegs = coco_like_jpegs(args.images)
    images = [Image.open(io.BytesIO(j)).convert("RGB") for j in jpegs]
    results: dict[str, Any] = {"benchmark": "gpu_bench", "dry_run": args.dry_run,
                               "model": "tiny random" if args.dry_run else "random ViT-B-16 (quickgelu)",
                               "environment": environment(args.device), "in_process": [], "service": []}
    for size in args.sizes:
        name = f"{'tiny' if args.dry_run else 'vit-b16'}-{size}-random.safetensors"
        checkpoint = make_checkpoint(runs / name, size, args.dry_run)
        loaded = load_checkpoint(checkpoint, "cpu")
        for dtype in args.dtypes:
            for geometry in args.geometries:
                for batch_size in args.batch_sizes:
                    row = bench_in_process(loaded, args.device, dtype, geometry, size, batch_size, images,
                                           args.iterations, args.warmup)
                    row.update(input_size=size, dtype=dtype, geometry=geometry)
                    results["in_process"].append(row)
                    print(json.dumps(row), flush=True)
                for batch_size in args.service_batch_sizes:
                    requests = args.service_requests or max(64, 8 * batch_size)
                    row = bench_service(checkpoint, args.device, dtype, geometry, size, batch_size, jpegs,
                                        requests, args.port, runs / "gpu_bench_service.log")
                    row.update(input_size=size, dtype=dtype, geometry=geometry)
                    results["service"].append(row)
                    print(json.dumps(row), flush=True)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
