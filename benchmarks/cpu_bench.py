"""CPU benchmark: seconds per image (end to end, forward, post-processing) of torch float32, torch bfloat16,
OpenVINO f32 and OpenVINO bf16, against this project's reference of the official order of work; one run.

Per architecture (``--archs``, default ViT-B/16 and ViT-B/32), a random official-layout release and OpenAI-layout
CLIP (``tests/model/official_reference``) are converted with ``model.convert_official`` (COCO vocabulary; native
geometry, as the official protocol) under ``--work-dir`` if absent. One smooth synthetic 480 x 640 image, concepts
person, car, dog. Variants, interleaved in every round (1 warm-up + ``--rounds``, medians):

- ``official``: ``official_forward`` at the image's size (every decoder layer), then the official ``predict``
  (semantic map and instances with the per-category hard-NMS loop over full-resolution masks);
- ``torch-f32``, ``torch-bf16``, ``openvino-f32``, ``openvino-bf16``: ``Predictor`` (native geometry) with that
  runtime and precision: ``prepare`` + ``forward`` + ``postprocess`` (semantic map included).

Also: the forward's FLOPs (``torch.utils.flop_counter``, float32 torch forward), the achieved GFLOP/s of each
variant's forward, and the machine's matrix-multiply peak measured in the same run (``--peak-size`` square
``torch.matmul`` in float32 and bfloat16, best of 5), and, with ``--service``, seconds per request through
``python -m service`` with default settings (only ``ZUTIS_CHECKPOINT`` set) on ViT-B/16, interleaved with the
official path; with ``--startup``, the OpenVINO export, first compile and restart costs (ViT-B/16). Timings on a
shared CPU are noisy: compare the ratios within one run.

    OMP_WAIT_POLICY=PASSIVE MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \\
        .venv/bin/python benchmarks/cpu_bench.py --rounds 3 --service --json-out runs/bench/cpu.json
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.fixtures import free_port, start_service, stop, wait_ready  # noqa: E402
from benchmarks.reports import write_json_report  # noqa: E402

CONCEPTS = ["person", "car", "dog"]
IMAGE_HW = (480, 640)
ARCHS = {"ViT-B-16": (16, 14), "ViT-B-32": (32, 7)}  # patch, official grid (224 / patch)
VARIANTS = ("torch-float32", "torch-bfloat16", "openvino-float32", "openvino-bfloat16")


def make_release(work_dir: Path, arch: str) -> tuple[dict[str, Any], Path]:
    """The random official state dict of ``arch`` (seed 0) and our converted checkpoint (written if absent)."""
    import torch

    from model.convert_official import convert_official
    from tests.model.official_reference import random_official_state_dict, random_openai_clip_state_dict

    patch, grid = ARCHS[arch]
    state = random_official_state_dict(768, 12, 12, patch, grid, 512, 100, 6, 8, 2048, 256, seed=0)
    out = work_dir / f"zutis-random-{arch.lower()}.safetensors"
    if not out.is_file():
        work_dir.mkdir(parents=True, exist_ok=True)
        zutis_path, clip_path = work_dir / f"official-{arch}.pt", work_dir / f"clip-{arch}.pt"
        torch.save(state, zutis_path)
        torch.save(random_openai_clip_state_dict(512, 768, 12, patch, grid, 512, 12, 77, seed=1), clip_path)
        convert_official(zutis_path, clip_path, "coco", out, arch=arch, command="benchmarks/cpu_bench.py")
        zutis_path.unlink()
        clip_path.unlink()
    return state, out


def synthetic_image(seed: int = 0) -> np.ndarray:
    """A smooth 480 x 640 RGB picture (uint8): blurred random blobs, like a photo to the network's cost."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(IMAGE_HW[::-1], Image.BICUBIC).filter(ImageFilter.GaussianBlur(4))
    return np.asarray(image)


def official_path(state: dict[str, Any], image: np.ndarray, text: Any) -> Callable[[], dict[str, float]]:
    """The reference of the official order of work: forward at the image's size, semantic and instance predict."""
    import torch

    from tests.model.official_reference import ViTSpec, official_forward, official_preprocess, predict

    vit = ViTSpec(768, 12, 12, int(state["encoder.conv1.weight"].shape[-1]))

    def run() -> dict[str, float]:
        start, start_cpu = time.perf_counter(), time.process_time()
        x = official_preprocess(image)
        with torch.no_grad():
            outputs = official_forward(state, vit, x)
        mid = time.perf_counter()
        answer = predict(outputs, text, tuple(image.shape[:2]), nms_iou=0.3)
        end = time.perf_counter()
        return {"total": end - start, "forward": mid - start, "postprocess": end - mid,
                "cpu": time.process_time() - start_cpu, "instances": len(answer["instances"][0])}

    return run


def project_path(predictor: Any, image: np.ndarray) -> Callable[[], dict[str, float]]:
    """``Predictor``: prepare + forward, then post-processing with the semantic map (vocabulary cached); wall
    seconds per stage, process CPU-seconds in all, and the number of instances."""
    vocabulary, text = predictor.encode_concepts(CONCEPTS)
    params = predictor.params()

    def run() -> dict[str, float]:
        start, start_cpu = time.perf_counter(), time.process_time()
        prepared = predictor.prepare(image)
        output = predictor.forward([prepared])
        mid = time.perf_counter()
        answer = predictor.postprocess(output, 0, prepared, vocabulary, text, params)
        end = time.perf_counter()
        return {"total": end - start, "forward": mid - start, "postprocess": end - mid,
                "cpu": time.process_time() - start_cpu, "instances": len(answer.instances)}

    return run


def forward_flops(predictor: Any, image: np.ndarray) -> float:
    """FLOPs of one float32 torch forward of ``image`` (``FlopCounterMode``: matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    prepared = predictor.prepare(image)
    for parameter in predictor.model.parameters():  # the counter's module hooks trip over inference-mode grads
        parameter.requires_grad_(False)
    with FlopCounterMode(display=False) as counter:
        predictor.forward([prepared])
    return float(counter.get_total_flops())


def matmul_peak(size: int, tokens: int = 4800, width: int = 768) -> dict[str, float]:
    """Best GFLOP/s in float32 and bfloat16 of a ``size`` square ``torch.matmul`` and of ``F.linear`` shaped as
    the ViT's MLP (``tokens x width`` by ``width x 4 width``; 4800 tokens: ViT-B/16 at 480 x 640), 3 calls each
    after a warm-up. Called once per round: the peak is the best of all rounds (on a shared CPU every figure is
    a lower bound)."""
    import torch
    import torch.nn.functional as F

    peak = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        x, w = torch.randn(tokens, width, dtype=dtype), torch.randn(4 * width, width, dtype=dtype)
        torch.matmul(a, b), F.linear(x, w)
        square = 2 * size**3 / min(_timed(lambda: torch.matmul(a, b)) for _ in range(3))
        linear = 2 * tokens * width * 4 * width / min(_timed(lambda: F.linear(x, w)) for _ in range(3))
        peak[str(dtype).removeprefix("torch.")] = max(square, linear) / 1e9
    return peak


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def service_path(checkpoint: Path, image: np.ndarray, log_path: Path) -> tuple[Any, Callable[[], float]]:
    """``python -m service`` with only ``ZUTIS_CHECKPOINT`` set (on a free loopback port), and a function that
    sends the image (PNG) with the concepts and returns the request's wall seconds."""
    import httpx
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    body = buf.getvalue()
    port = free_port()
    # nothing but the checkpoint and the port set: the defaults are what is measured (ZUTIS_CACHE_DIR passes,
    # where OpenVINO exports go on a CPU)
    process = start_service(checkpoint, port, log_path)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, process, 600.0, log_path)

    def send() -> float:
        start = time.perf_counter()
        answer = httpx.post(f"{url}/segment", files={"image": ("image.png", body, "image/png")},
                            data={"concepts": ",".join(CONCEPTS)}, timeout=120.0)
        answer.raise_for_status()
        return time.perf_counter() - start

    return process, send


def median_stages(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0]}


def bench_arch(arch: str, args: argparse.Namespace, image: np.ndarray, peak: dict[str, float]) -> dict[str, Any]:
    """Every variant of one architecture, interleaved; medians, speed-ups against the official path, GFLOP/s."""

    from model.predictor import Predictor

    state, checkpoint = make_release(args.work_dir, arch)
    predictors = {name: Predictor.from_checkpoint(checkpoint, "cpu", name.split("-")[1], runtime=name.split("-")[0],
                                                  cache_dir=args.work_dir / "cache")
                  for name in args.variants}
    reference = Predictor.from_checkpoint(checkpoint, "cpu", "float32", runtime="torch")
    flops = forward_flops(reference, image)
    _, text = reference.encode_concepts(CONCEPTS)
    del reference
    paths = {"official": official_path(state, image, text)}
    paths.update({name: project_path(p, image) for name, p in predictors.items()})
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
    for round_ in range(args.rounds + 1):
        for precision, gflops in matmul_peak(args.peak_size).items():
            peak[precision] = max(peak.get(precision, 0.0), gflops)
        for name, run in paths.items():
            result = run()
            if round_:  # the first round warms up (and compiles OpenVINO for this size)
                runs[name].append(result)
        print(f"{arch} round {round_}: " + ", ".join(f"{n} {r[-1]['total']:.3f}" for n, r in runs.items() if r),
              flush=True)
    report: dict[str, Any] = {"forward_gflop": round(flops / 1e9, 1), "variants": {},
                              "matmul_peak_gflops": {k: round(v, 1) for k, v in peak.items()}}
    official_total = statistics.median(r["total"] for r in runs["official"])
    for name, rs in runs.items():
        stages = median_stages(rs)
        # Each round's official and variant ran seconds apart: their ratio drifts less with the machine's load.
        per_round = [o["total"] / r["total"] for o, r in zip(runs["official"], rs)]
        entry: dict[str, Any] = {"seconds": stages, "speedup_vs_official": round(official_total / stages["total"], 2),
                                 "speedup_per_round": [round(v, 2) for v in per_round],
                                 # CPU-seconds of the process (all its threads): less sensitive to other jobs
                                 "cpu_speedup": round(statistics.median(r["cpu"] for r in runs["official"])
                                                      / stages["cpu"], 2),
                                 "seconds_best": {k: round(min(r[k] for r in rs), 4) for k in rs[0]},
                                 "forward_gflops": round(flops / stages["forward"] / 1e9, 1)}
        precision = "bfloat16" if name.endswith("bfloat16") else "float32"
        entry["forward_fraction_of_peak"] = round(flops / stages["forward"] / 1e9 / peak[precision], 3)
        best = entry["seconds_best"]["forward"]
        entry["best_forward_fraction_of_peak"] = round(flops / best / 1e9 / peak[precision], 3)
        report["variants"][name] = entry
    return report


def bench_service(args: argparse.Namespace, image: np.ndarray) -> dict[str, Any]:
    """ViT-B/16 through ``python -m service`` (defaults) vs the official path, interleaved, medians."""
    from model.predictor import Predictor

    state, checkpoint = make_release(args.work_dir, "ViT-B-16")
    _, text = Predictor.from_checkpoint(checkpoint, "cpu", "float32").encode_concepts(CONCEPTS)
    official = official_path(state, image, text)
    process, send = service_path(checkpoint, image, args.work_dir / "service.log")
    try:
        send()  # the first request at this size compiles (or loads from the cache) OpenVINO for it
        service_s, official_s = [], []
        for _ in range(args.rounds):
            service_s.append(send())
            official_s.append(official()["total"])
    finally:
        stop(process, 30.0)
    s, o = statistics.median(service_s), statistics.median(official_s)
    return {"service_seconds": round(s, 4), "official_seconds": round(o, 4), "speedup": round(o / s, 2),
            "service_runs": [round(v, 4) for v in service_s], "official_runs": [round(v, 4) for v in official_s]}


def bench_startup(args: argparse.Namespace, image: np.ndarray) -> dict[str, Any]:
    """ViT-B/16 with the default precision: seconds to load with torch, to load and export to OpenVINO into an
    empty cache, to compile the 480 x 640 size on its first image, and after a restart (same cache) to load and
    to run the first image (compiled network read from the cache), each first image less a steady one."""
    import tempfile

    from model.predictor import Predictor

    _, checkpoint = make_release(args.work_dir, "ViT-B-16")
    report: dict[str, Any] = {}
    start = time.perf_counter()
    Predictor.from_checkpoint(checkpoint, "cpu", runtime="torch")
    report["load_torch_s"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as cache:
        for phase in ("first_start", "restart"):
            start = time.perf_counter()
            predictor = Predictor.from_checkpoint(checkpoint, "cpu", runtime="openvino", cache_dir=cache)
            report[f"{phase}_load_s"] = time.perf_counter() - start
            prepared = predictor.prepare(image)
            first = _timed(lambda: predictor.forward([prepared]))
            steady = min(_timed(lambda: predictor.forward([prepared])) for _ in range(2))
            report[f"{phase}_first_image_extra_s"] = first - steady
    return {k: round(v, 2) for k, v in report.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="*", default=list(ARCHS), choices=list(ARCHS),
                        help="architectures to time in-process (none: only --service / --startup)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="the project's variants to time beside the official path")
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the square matmul of the peak")
    parser.add_argument("--service", action="store_true", help="also time ViT-B/16 through python -m service")
    parser.add_argument("--startup", action="store_true", help="also time ViT-B/16's OpenVINO export, compile and "
                        "restart")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "runs" / "bench" / "cpu")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)

    import torch

    from model.dtypes import native_bf16_feature

    torch.set_flush_denormal(True)
    image = synthetic_image()
    peak: dict[str, float] = {}
    report: dict[str, Any] = {
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "native_bf16": native_bf16_feature(), "load_average": os.getloadavg(),
                        "image_hw": list(IMAGE_HW)},
        "archs": {},
    }
    for arch in args.archs:
        report["archs"][arch] = bench_arch(arch, args, image, peak)
    if args.service:
        report["service"] = bench_service(args, image)
    if args.startup:
        report["startup"] = bench_startup(args, image)
    report["matmul_peak_gflops"] = {k: round(v, 1) for k, v in peak.items()}
    report["environment"]["load_average_end"] = os.getloadavg()
    import json

    print(json.dumps(report, indent=2))
    if args.json_out:
        write_json_report(args.json_out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
