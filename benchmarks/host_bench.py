"""Host-side CPU cost per image of a GPU deployment: everything that stays on the CPU when the model runs on a
GPU, by stage, in CPU-milliseconds per image, and the images/s per host core that this allows.

For one 640 x 480 JPEG upload (smooth photo-like content, ~90 KB) with about 10 instances in its answer:

- ``upload_parsing``: Starlette's multipart parsing of the request body (``await request.form()``, the image part
  spooled to a temporary file, the concepts as form fields), and reading the image bytes back;
- ``jpeg_decode``: ``service.upload.decode_image`` (header checks, Pillow's decode, RGB);
- ``resize_normalise``: ``Predictor.prepare`` (PIL bilinear resize when the geometry needs it, to float, mean/std,
  into the input tensor): letterbox at S = 640 and 384, native at cap 640 and 384;
- ``rle``: COCO RLE of the ~10 full-resolution boolean masks as they arrive from the GPU (``encode_masks``
  transposes them to column order on the device; ``model.rle.encode_column_major``); a CPU-only host also
  transposes and boxes them on the CPU (reported apart, not in the totals);
- ``png``: the semantic label map as a base64 PNG (``model.rle.encode_semantic_png``);
- ``json``: the pydantic answer (``model.answer``'s models, masks and semantic map already encoded) to UTF-8 JSON bytes.

The network, the candidate scoring, the mask resampling and NMS run on the GPU there and are not counted (on a
CPU-only host they are: see ``benchmarks/postprocess_bench.py``). Each stage runs ``--repeats`` times on one
thread with one torch thread; the median of the thread's CPU time (``time.thread_time``) is reported.

    OMP_WAIT_POLICY=PASSIVE MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \\
        .venv/bin/python benchmarks/host_bench.py \\
        --json-out runs/bench/host.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.fixtures import blob_jpeg, blob_masks  # noqa: E402 (importable once the line above ran)
from benchmarks.reports import write_json_report  # noqa: E402

IMAGE_HW = (480, 640)
INSTANCES = 10
CLASSES = 6


def multipart_body(image: bytes, concepts: str) -> tuple[bytes, str]:
    boundary = "zutisbenchboundary7MA4YWxkTrZu0gW"
    parts = [
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"concepts\"\r\n\r\n{concepts}\r\n".encode(),
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"semantic\"\r\n\r\npng\r\n".encode(),
        (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"photo.jpg\"\r\n"
         "Content-Type: image/jpeg\r\n\r\n").encode() + image + b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def parse_upload(body: bytes, content_type: str) -> bytes:
    """What FastAPI does with a /segment body: Starlette's multipart parser, then the route reads the file back."""
    from starlette.requests import Request

    async def run() -> bytes:
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {"type": "http", "method": "POST", "path": "/segment", "headers": [
            (b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]}
        form = await Request(scope, receive).form(max_files=1, max_fields=100)
        upload = form["image"]
        upload.file.seek(0)
        data = upload.file.read()
        await form.close()
        return data

    return asyncio.run(run())


def cpu_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median CPU milliseconds of this thread over ``repeats`` calls (after one untimed call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append((time.thread_time() - start) * 1e3)
    return round(statistics.median(times), 3)


def measure(repeats: int) -> dict[str, Any]:
    import torch

    from model.checkpoint import load_checkpoint
    from model.postprocess import InstancePrediction, Prediction
    from model.predictor import Predictor
    from model.rle import encode_column_major, encode_masks, encode_semantic_png, masks_to_boxes_xywh
    from model.answer import RLE, ImageSize, Instance, SegmentResponse, SemanticMap
    from service.upload import decode_image

    torch.set_num_threads(1)
    jpeg = blob_jpeg(*IMAGE_HW, noise=6.0)
    body, content_type = multipart_body(jpeg, "person, car, dog, chair, cup")
    masks = torch.from_numpy(blob_masks(IMAGE_HW, INSTANCES))
    label_map = np.zeros(IMAGE_HW, dtype=np.uint16)
    for k in range(INSTANCES):
        label_map[masks[k].numpy()] = 1 + k % (CLASSES - 1)
    vocabulary = ["background", "person", "car", "dog", "chair", "cup"]

    checkpoint = REPO_ROOT / "weights" / "zutis-shapes.safetensors"  # only its preprocessing metadata is used
    loaded = load_checkpoint(checkpoint, "cpu")
    predictors = {f"{g}_{s}": Predictor(loaded, torch.device("cpu"), torch.float32, s, g)
                  for g in ("letterbox", "native") for s in (640, 384)}
    image = decode_image(jpeg, 40_000_000)
    columns = masks.transpose(1, 2).contiguous().numpy()  # what a GPU hands over
    rles = encode_masks(masks)
    boxes = masks_to_boxes_xywh(masks).tolist()
    prediction = Prediction(IMAGE_HW, vocabulary, [
        InstancePrediction(1 + k % (CLASSES - 1), vocabulary[1 + k % (CLASSES - 1)], 0.9 - 0.01 * k,
                           tuple(boxes[k]), int(masks[k].sum()), masks[k]) for k in range(INSTANCES)], label_map)
    png = encode_semantic_png(label_map)
    h, w = IMAGE_HW

    def answer_json() -> bytes:
        # the answer's models filled with masks already encoded (the RLE and PNG stages are measured apart)
        response = SegmentResponse(model="model@000000000000", image=ImageSize(width=w, height=h),
                                   concepts=vocabulary, semantic=SemanticMap(format="png", png=png), instances=[
            Instance(concept=inst.concept, concept_index=inst.concept_index, score=round(inst.score, 6),
                     bbox=list(inst.bbox_xywh), area=inst.area, segmentation=RLE(**rle))
            for inst, rle in zip(prediction.instances, rles)])
        return response.model_dump_json().encode()

    stages = {
        "upload_parsing": cpu_ms(lambda: parse_upload(body, content_type), repeats),
        "jpeg_decode": cpu_ms(lambda: decode_image(jpeg, 40_000_000), repeats),
        "resize_normalise": {name: cpu_ms(lambda p=p: p.prepare(image), repeats) for name, p in predictors.items()},
        # on a GPU host the masks arrive transposed (encode_masks transposes on the device): RLE of that buffer
        "rle": cpu_ms(lambda: encode_column_major(columns), repeats),
        "png": cpu_ms(lambda: encode_semantic_png(label_map), repeats),
        "json": cpu_ms(answer_json, repeats),
    }
    fixed = sum(v for k, v in stages.items() if k != "resize_normalise")
    totals = {name: round(fixed + ms, 3) for name, ms in stages["resize_normalise"].items()}
    return {
        "image_hw": list(IMAGE_HW), "jpeg_bytes": len(jpeg), "instances": INSTANCES,
        "answer_bytes": len(answer_json()), "repeats": repeats, "stages_cpu_ms": stages,
        # not in the totals: on a CPU-only host the masks are transposed (and boxed) on the CPU as well
        "cpu_host_rle_with_transpose_and_boxes_ms": cpu_ms(
            lambda: (encode_masks(masks), masks_to_boxes_xywh(masks).tolist()), repeats),
        "total_cpu_ms": totals,
        "images_per_s_per_core": {name: round(1000.0 / ms, 1) for name, ms in totals.items()},
        "cores_for_1000_images_per_s": {name: round(ms, 1) for name, ms in totals.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    result = measure(args.repeats)
    print(json.dumps(result, indent=2))
    write_json_report(args.json_out, result, announce=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
