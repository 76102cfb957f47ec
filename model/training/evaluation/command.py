"""The command line of ``python -m model.evaluate`` (entry module ``model/evaluate.py``): its parser and ``main``.

Either runs a checkpoint over a dataset (``--checkpoint`` with ``--images`` and ``--coco`` or
``--semantic-labels`` + ``--concepts``) or scores an existing COCO results file (``--results`` with ``--coco``);
prints the report as a table (``format_report``) and can write it, and the model's COCO results, as JSON.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model.answer import segmentation_to_rle
from model.training.evaluation.coco_ap import load_coco_json
from model.training.evaluation.datasets import EvalDataset, load_coco_dataset, load_label_folder_dataset
from model.training.evaluation.runner import evaluate_checkpoint, format_report, score

DESCRIPTION = ('Evaluation: COCO mask AP (pycocotools ``COCOeval``, ``iouType="segm"``) and semantic mIoU / pixel '
               'accuracy.')
"""The ``--help`` description (the first line of the evaluation package's docstring)."""


def _parse_subset(text: str) -> tuple[str, list[str]]:
    """``NAME=a,b,c`` as ``(NAME, [a, b, c])`` (members stripped, empty ones dropped)."""
    name, sep, members = text.partition("=")
    if not sep or not name or not members:
        raise argparse.ArgumentTypeError(f"--subset takes NAME=concept,concept,...; got {text!r}")
    return name, [m.strip() for m in members.split(",") if m.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m model.evaluate``."""
    parser = argparse.ArgumentParser(prog="python -m model.evaluate", description=DESCRIPTION)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="model checkpoint to run")
    source.add_argument("--results", type=Path, help="existing COCO results JSON to score (needs --coco)")
    parser.add_argument("--coco", type=Path, help="COCO instances JSON (GT)")
    parser.add_argument("--images", type=Path, help="image folder")
    parser.add_argument("--semantic-labels", type=Path, help="folder of label PNGs (class index, 255 = ignore)")
    parser.add_argument("--concepts", nargs="+", help="vocabulary (default: every dataset class); with a label "
                        "folder and no --coco, the class names for PNG values 1, 2, ...")
    parser.add_argument("--subset", type=_parse_subset, action="append", default=[], metavar="NAME=A,B",
                        help="also report metrics over these concepts only (repeatable)")
    parser.add_argument("--class-agnostic", action="store_true", help="class-agnostic mask AP")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on a CPU with native bf16, else fp32; fp16 on "
                        "GPU), float32 (the official code's answers exactly), bfloat16, float16")
    parser.add_argument("--runtime", default="auto", choices=["auto", "torch", "openvino"],
                        help="what runs the image network (auto: OpenVINO on a CPU when installed, else torch)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--geometry", choices=["letterbox", "native"],
                        help="letterbox into S x S, or native (each image at its own size, the official protocol); "
                             "default: the checkpoint's")
    parser.add_argument("--input-size", type=int, help="override the checkpoint's input size (letterbox side S, or "
                        "the longer-side cap in native geometry; the official ImageNet-S protocol caps at 1024)")
    parser.add_argument("--max-images", type=int, help="evaluate only the first N images")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--save-results", type=Path, help="write the model's COCO results JSON here")
    parser.add_argument("--no-exif-orientation", dest="exif_orientation", action="store_false",
                        help="keep images in their stored pixel grid instead of turning them upright by their EXIF "
                             "orientation (the default; the annotations must then be in the stored grid)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command on ``argv`` (default: ``sys.argv[1:]``): print the report table; 0 on success."""
    args = build_parser().parse_args(argv)
    subsets = dict(args.subset)
    if args.results is not None:
        report = _score_results_file(args, subsets)
    else:
        report = _evaluate_checkpoint(args, subsets)
    print(format_report(report))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2))
        print(f"report written to {args.out}")
    return 0


def _score_results_file(args: argparse.Namespace, subsets: dict[str, list[str]]) -> dict[str, Any]:
    """The report for ``--results`` against ``--coco`` (classes: the COCO categories sorted by id)."""
    if args.coco is None:
        raise SystemExit("--results needs --coco")
    if not args.results.is_file():
        raise FileNotFoundError(f"results file not found: {args.results}")
    with args.results.open() as f:
        results = json.load(f)
    coco = load_coco_json(args.coco)
    results = with_rle_segmentations(results, coco)
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    dataset = EvalDataset((), tuple(c["name"] for c in cats), tuple(c["id"] for c in cats), coco)
    return score(dataset, results, None, args.concepts or list(dataset.class_names),
                 class_agnostic=args.class_agnostic, subsets=subsets,
                 image_ids=[img["id"] for img in coco["images"]])


def with_rle_segmentations(results: list[dict[str, Any]], coco: dict[str, Any]) -> list[dict[str, Any]]:
    """COCO results whose polygon segmentations (answers of ``mask_format=polygon``) are rasterised to RLE at
    their image's size (``model.answer``); RLE results and results of unknown images are left as they are (the
    scoring reports those)."""
    sizes = {img["id"]: (int(img["height"]), int(img["width"])) for img in coco["images"]
             if "height" in img and "width" in img}
    converted = []
    for k, result in enumerate(results):
        segmentation = result.get("segmentation") if isinstance(result, dict) else None
        if isinstance(segmentation, list) and result.get("image_id") in sizes:
            try:
                segmentation = segmentation_to_rle(segmentation, sizes[result["image_id"]])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"result #{k}: bad polygon segmentation ({exc})") from None
            result = {**result, "segmentation": segmentation}
        converted.append(result)
    return converted


def _evaluate_checkpoint(args: argparse.Namespace, subsets: dict[str, list[str]]) -> dict[str, Any]:
    """The report for ``--checkpoint`` run over ``--images``; writes its COCO results to ``--save-results``."""
    if args.images is None:
        raise SystemExit("--checkpoint needs --images")
    if args.coco is not None:
        dataset = load_coco_dataset(args.coco, args.images, args.semantic_labels)
        concepts = args.concepts
    elif args.semantic_labels is not None and args.concepts:
        dataset = load_label_folder_dataset(args.images, args.semantic_labels, args.concepts)
        concepts = None
    else:
        raise SystemExit("give --coco, or --semantic-labels with --concepts")
    evaluation = evaluate_checkpoint(args.checkpoint, dataset, concepts, device=args.device,
                                     geometry=args.geometry, input_size=args.input_size, dtype=args.dtype,
                                     runtime=args.runtime, class_agnostic=args.class_agnostic, subsets=subsets,
                                     batch_size=args.batch_size, max_images=args.max_images, progress=True,
                                     exif_orientation=args.exif_orientation)
    if args.save_results is not None:
        args.save_results.write_text(json.dumps(evaluation.results))
    return evaluation.report


__all__ = ["DESCRIPTION", "build_parser", "main"]
