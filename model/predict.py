"""Segment one image from the command line; prints the same JSON that ``POST /segment`` returns.

    python -m model.predict --checkpoint weights/zutis-shapes.safetensors --image examples/shapes-1.png \\
        --concepts "red circle,blue star" --out result.json --overlay overlay.png

The answer is encoded by ``model.answer``, as the service's is, so that the command and the service print the same
JSON. torch and what loads it (the predictor, the overlay) are
imported once the arguments are good, so that ``--help`` and argument errors are instant.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from model.orientation import apply_exif_orientation
from model.answer import DEFAULT_POLYGON_TOLERANCE, AnswerFormat, Timings, encode_answer


def split_concepts(values: list[str]) -> list[str]:
    """Repeated and/or comma-separated concept arguments -> a flat list (blanks dropped; normalised later, once,
    by the predictor's vocabulary)."""
    return [c.strip() for v in values for c in v.split(",") if c.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    parser = argparse.ArgumentParser(prog="python -m model.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (.safetensors, our format)")
    parser.add_argument("--image", required=True, help="image file (PNG, JPEG, WebP, ...)")
    parser.add_argument("--concepts", required=True, action="append",
                        help="comma-separated concept names; may be repeated")
    parser.add_argument("--out", help="write the JSON here instead of stdout")
    parser.add_argument("--overlay", help="write a picture of the answer (masks, labels, scores) here")
    parser.add_argument("--semantic", choices=["png", "rle", "none"], default="png")
    parser.add_argument("--mask-format", choices=["rle", "polygon"], default="rle",
                        help="instance masks as COCO RLE (default) or COCO polygons (no holes)")
    parser.add_argument("--polygon-tolerance", type=float, default=DEFAULT_POLYGON_TOLERANCE,
                        help="polygon simplification, in pixels (default %(default)s; 0 keeps every corner)")
    parser.add_argument("--score-threshold", type=float)
    parser.add_argument("--mask-threshold", type=float)
    parser.add_argument("--nms-iou", type=float)
    parser.add_argument("--max-instances", type=int)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on a CPU with native bf16, else fp32; fp16 on "
                        "GPU), float32 (the official code's answers exactly), float16, bfloat16")
    parser.add_argument("--runtime", default="auto", choices=["auto", "torch", "openvino"],
                        help="what runs the image network (auto: OpenVINO on a CPU when installed, else torch)")
    parser.add_argument("--cache-dir", help="where the OpenVINO export is kept (default $ZUTIS_CACHE_DIR or "
                        "~/.cache/zutis)")
    parser.add_argument("--input-size", type=int, help="override the checkpoint's input size (letterbox side S, "
                        "or the longer-side cap in native geometry)")
    parser.add_argument("--geometry", choices=["letterbox", "native"],
                        help="letterbox into S x S, or native (each image at its own size, the official protocol); "
                             "default: the checkpoint's")
    parser.add_argument("--no-exif-orientation", dest="exif_orientation", action="store_false",
                        help="keep the stored pixel grid instead of turning photos upright by their EXIF "
                             "orientation (the default, as the service does)")
    return parser


def read_image(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Image.Image:
    """The ``--image`` file (upright unless ``--no-exif-orientation``); a missing or unreadable file (or
    checkpoint) ends the command through ``parser.error`` (status 2)."""
    for flag, path in (("--checkpoint", args.checkpoint), ("--image", args.image)):
        if not Path(path).is_file():
            parser.error(f"{flag}: file not found: {path}")
    try:
        image = Image.open(args.image)
        image.load()  # the first picture of a multi-picture JPEG (MPO) or an animation
    except (UnidentifiedImageError, OSError) as exc:
        parser.error(f"--image: cannot read {args.image} as an image ({exc})")
    return apply_exif_orientation(image) if args.exif_orientation else image


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.polygon_tolerance >= 0 or args.polygon_tolerance == float("inf"):
        parser.error(f"--polygon-tolerance: must be a finite number >= 0, got {args.polygon_tolerance}")
    image = read_image(parser, args)

    import torch  # deferred (with what loads it) so that --help and argument errors are instant

    from model.overlay import draw_overlay
    from model.predictor import Predictor

    torch.set_flush_denormal(True)
    try:
        predictor = Predictor.from_checkpoint(args.checkpoint, args.device, args.dtype, args.input_size,
                                               args.geometry, args.runtime, args.cache_dir)
        t0 = time.perf_counter()
        prediction = predictor.predict([image], split_concepts(args.concepts), semantic=args.semantic != "none",
                                       score_threshold=args.score_threshold, mask_threshold=args.mask_threshold,
                                       nms_iou=args.nms_iou, max_instances=args.max_instances)[0]
        elapsed = (time.perf_counter() - t0) * 1000
    except ValueError as exc:
        parser.error(str(exc))
    answer_format = AnswerFormat(args.semantic, args.mask_format, args.polygon_tolerance)
    response = encode_answer(prediction, predictor.model_id, answer_format,
                             Timings(queue_ms=0.0, inference_ms=round(elapsed, 3), total_ms=round(elapsed, 3)))
    text = response.model_dump_json(indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    if args.overlay:
        draw_overlay(image, response, semantic=prediction.semantic).save(args.overlay)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
