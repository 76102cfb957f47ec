"""Native vs letterbox geometry on CPU, in one run: images/s and padded fraction on a mix of COCO-like sizes.

The same predictor (a random ViT checkpoint; random weights cost the same time as trained ones) runs a fixed
stream of JPEG-decoded images of COCO's common sizes through ``prepare -> forward -> postprocess`` in batches:

- ``letterbox``: every image in an S x S square, first come, first served;
- ``native``: each image at its own size (longer side capped at S), batched the way the service batches a full
  queue (``service.batcher.choose_batch`` with ``--max-batch-padding``), and also plain first come, first served.

Reported per geometry: images/s (wall) and images per CPU-second of this process, encoder tokens per image, and
the padded fraction of the forward passes' inputs (letterbox: padded pixels of the squares; native: padded token
slots of the ragged batches). Timings on a shared CPU are noisy (wall time most): compare the ratios within one
run.

    OMP_WAIT_POLICY=PASSIVE MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \\
        .venv/bin/python benchmarks/geometry_bench.py --arch ViT-B-32-quickgelu --input-size 640 --images 8 \\
        --batch-size 4 --json-out runs/bench/geometry.json
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# importable once the lines above ran:
from benchmarks.fixtures import coco_like_jpegs, random_checkpoint, vit_b16_config  # noqa: E402
from benchmarks.reports import write_json_report  # noqa: E402

def run_geometry(predictor, jpegs: list[bytes], batches: list[list[int]], concepts: list[str]) -> dict:
    """Decode, prepare, forward and post-process every batch; images/s and the batches' padded fraction."""
    from PIL import Image

    vocabulary, text = predictor.encode_concepts(concepts)
    params = predictor.params()
    start, start_cpu = time.perf_counter(), time.process_time()
    padded, slots, tokens = 0.0, 0.0, 0
    for batch in batches:
        prepared = [predictor.prepare(Image.open(io.BytesIO(jpegs[i])).convert("RGB")) for i in batch]
        output = predictor.forward(prepared)
        for index, p in enumerate(prepared):
            predictor.postprocess(output, index, p, vocabulary, text, params)
        fraction = predictor.padded_fraction(prepared)
        lengths = [predictor.sequence_length(p) for p in prepared]
        tokens += sum(lengths)
        # weight each pass's padded fraction by its size (token slots) for the run's overall fraction
        size = len(prepared) * max(lengths)
        padded, slots = padded + fraction * size, slots + size
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    n = sum(len(b) for b in batches)
    # CPU seconds (all threads of this process) are steadier than wall time on a CPU shared with other work
    return {"images": n, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 4),
            "cpu_seconds": round(cpu_seconds, 3), "images_per_cpu_s": round(n / cpu_seconds, 4),
            "tokens_per_image": round(tokens / n, 1), "padded_fraction": round(padded / slots, 4),
            "mean_batch_size": round(n / len(batches), 2)}


def fifo_batches(count: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size)]


def grouped_batches(lengths: list[int], batch_size: int, max_padding: float) -> list[list[int]]:
    """The service's grouping of a full queue: repeatedly ``choose_batch`` over what is still waiting."""
    from service.batcher import choose_batch

    waiting = list(range(len(lengths)))
    batches = []
    while waiting:
        chosen = choose_batch([lengths[i] for i in waiting], batch_size, max_padding)
        batches.append([waiting[i] for i in chosen])
        waiting = [w for k, w in enumerate(waiting) if k not in set(chosen)]
    return batches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-16-quickgelu", help="open_clip architecture of the random model")
    parser.add_argument("--input-size", type=int, default=640, help="letterbox side S = native longer-side cap")
    parser.add_argument("--checkpoint", type=Path, help="default: runs/bench/<arch>-<size>-random.safetensors")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-batch-padding", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)

    import torch

    from model.predictor import Predictor

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    path = args.checkpoint or REPO_ROOT / f"runs/bench/{args.arch.lower()}-{args.input_size}-random.safetensors"
    if not path.is_file():
        random_checkpoint(path, vit_b16_config(args.input_size, args.arch), model_id=f"random-{args.arch.lower()}",
                          made_by="benchmarks/geometry_bench.py")
    jpegs = coco_like_jpegs(args.images)
    concepts = ["person", "car", "chair", "dog", "cup"]
    results: dict = {"arch": args.arch, "input_size": args.input_size, "images": args.images,
                     "batch_size": args.batch_size, "max_batch_padding": args.max_batch_padding,
                     "torch_threads": torch.get_num_threads(), "device": "cpu"}
    letterbox = Predictor.from_checkpoint(path, "cpu", "float32", args.input_size, "letterbox")
    native = Predictor.from_checkpoint(path, "cpu", "float32", args.input_size, "native")
    from PIL import Image

    lengths = [native.sequence_length(native.prepare(Image.open(io.BytesIO(j)).convert("RGB"))) for j in jpegs]
    # warm-up: one pass each, not timed
    run_geometry(letterbox, jpegs, [[0]], concepts)
    run_geometry(native, jpegs, [[0]], concepts)
    fifo = fifo_batches(len(jpegs), args.batch_size)
    results["letterbox"] = run_geometry(letterbox, jpegs, fifo, concepts)
    results["native_grouped"] = run_geometry(native, jpegs, grouped_batches(lengths, args.batch_size,
                                                                             args.max_batch_padding), concepts)
    results["native_fifo"] = run_geometry(native, jpegs, fifo, concepts)
    for key in ("native_grouped", "native_fifo"):
        for measure in ("images_per_s", "images_per_cpu_s"):
            results[key][f"{measure}_vs_letterbox"] = round(results[key][measure] / results["letterbox"][measure],
                                                            3)
    print(json.dumps(results, indent=2))
    write_json_report(args.json_out, results, announce=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
