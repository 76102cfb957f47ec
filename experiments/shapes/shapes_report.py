"""Shapes-world report tables for one checkpoint, every number from ``model.evaluate`` on held-out scenes.

For a checkpoint written by ``python -m model.train --config model/configs/shapes*.json`` it reads the run's
provenance (test scenes, retrieval and pseudo-mask stages, index truth) and measures:

- seen / unseen / all: mask AP, AP50, AP75 (COCO, category-aware, score floor 0.001) and semantic mIoU, with the
  full 64-concept vocabulary given to the model, metrics computed over each category subset;
- a temperature sweep (``--taus``; tau is inference-only: the same checkpoint re-evaluated);
- training-data quality: for every retrieved index image, whether it holds its concept (retrieval precision) and
  the IoU of its pseudo-mask with the generator's truth (the union of the image's true objects; and, for
  single-object images, that object), from the hidden sidecar the method itself never reads.

    MALLOC_MMAP_THRESHOLD_=33554432 .venv/bin/python experiments/shapes/shapes_report.py \\
        --checkpoint weights/zutis-shapes.safetensors --taus 0.1 0.5 1 5 10 --out runs/shapes/report-main.json

A script, not a test. Prints the tables as Markdown; ``--out`` writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.reports import write_json_report  # noqa: E402 (importable once the line above ran)


def split_metrics(report: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """``{"all" | "seen" | "unseen": {"AP", "AP50", "AP75", "mIoU"}}`` from a ``model.evaluate`` report."""
    def row(section: dict[str, Any]) -> dict[str, float | None]:
        inst, sem = section.get("instances") or {}, section.get("semantic") or {}
        return {"AP": inst.get("AP"), "AP50": inst.get("AP50"), "AP75": inst.get("AP75"), "mIoU": sem.get("mIoU")}

    return {"all": row(report), **{name: row(sub) for name, sub in report.get("subsets", {}).items()}}


def evaluate_scenes(checkpoint: Path, scenes: Path, subsets: dict[str, list[str]], max_images: int | None,
                    **overrides: Any) -> dict[str, Any]:
    from model.training.evaluation.datasets import load_coco_dataset
    from model.training.evaluation.runner import evaluate_checkpoint

    dataset = load_coco_dataset(scenes / "instances.json", scenes / "images", scenes / "labels")
    evaluation = evaluate_checkpoint(checkpoint, dataset, subsets=subsets, max_images=max_images,
                                     score_threshold=0.001, **overrides)
    return evaluation.report


def training_data_quality(retrieval_json: Path, pseudo_mask_dir: Path | None, truth_json: Path,
                          concepts: Sequence[str]) -> dict[str, Any]:
    """Retrieval precision and pseudo-mask IoU against the index's hidden truth (see the module docstring)."""
    from pycocotools import mask as mask_utils

    truth = json.loads(truth_json.read_text())
    name_of = {c["id"]: c["name"] for c in truth["categories"]}
    by_file: dict[str, dict[str, Any]] = {img["file_name"]: {"kind": img["kind"], "objects": []}
                                          for img in truth["images"]}
    file_of = {img["id"]: img["file_name"] for img in truth["images"]}
    for ann in truth["annotations"]:
        by_file[file_of[ann["image_id"]]]["objects"].append((name_of[ann["category_id"]], ann["segmentation"]))
    retrieval = json.loads(retrieval_json.read_text())
    hits, single_hits, total = 0, 0, 0
    for concept in concepts:
        for path in retrieval.get(concept, []):
            record = by_file[Path(path).name]
            names = [n for n, _ in record["objects"]]
            total += 1
            hits += concept in names
            single_hits += names == [concept]
    out: dict[str, Any] = {"retrieved": total, "retrieval_precision": hits / max(1, total),
                           "retrieval_single_object_precision": single_hits / max(1, total)}
    if pseudo_mask_dir is None:
        return out
    from model.training.pseudo_masks.shards import load_pseudo_masks

    masks = load_pseudo_masks(pseudo_mask_dir)
    union_ious: dict[str, list[float]] = {"single": [], "multi": [], "empty": []}
    for path, rle in masks.items():
        record = by_file[Path(path).name]
        pred = mask_utils.decode(rle if isinstance(rle["counts"], bytes) else
                                 {"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
        gt = np.zeros_like(pred)
        for _, seg in record["objects"]:
            gt |= mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
        union = (pred | gt).sum()
        union_ious[record["kind"]].append(float((pred & gt).sum() / union) if union else 1.0)
    every = [v for vs in union_ious.values() for v in vs]
    out.update(pseudo_masks=len(masks), pseudo_mask_miou=float(np.mean(every)) if every else None,
               pseudo_mask_miou_by_kind={k: (float(np.mean(v)) if v else None, len(v)) for k, v in union_ious.items()})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--scenes", type=Path, help="scene folder (default: the run's test scenes)")
    parser.add_argument("--taus", type=float, nargs="*", default=[], help="temperatures to re-evaluate with")
    parser.add_argument("--max-images", type=int, help="evaluate only the first N scenes")
    parser.add_argument("--no-data-quality", action="store_true", help="skip the training-data measurements")
    parser.add_argument("--out", type=Path, help="write the JSON here")
    args = parser.parse_args(argv)

    import torch

    torch.set_flush_denormal(True)
    from model.checkpoint import read_metadata
    from model.training.shapes.world import ShapesWorld

    meta = read_metadata(args.checkpoint)
    prov = meta.provenance
    config = prov["config"]
    scenes = args.scenes or Path(config["eval"]["image_dir"]).parent
    world = ShapesWorld()
    subsets = {split: world.split_names(split) for split in ("seen", "unseen")}
    result: dict[str, Any] = {"checkpoint": str(args.checkpoint), "scenes": str(scenes),
                              "default_temperature": meta.inference.temperature,
                              "score_threshold": meta.inference.score_threshold,
                              "timings_seconds": prov.get("timings_seconds"), "steps": prov.get("steps")}
    start = time.perf_counter()
    main_report = evaluate_scenes(args.checkpoint, scenes, subsets, args.max_images)
    result["main"] = split_metrics(main_report)
    result["num_images"] = main_report["num_images"]
    result["taus"] = {}
    for tau in args.taus:
        rep = evaluate_scenes(args.checkpoint, scenes, subsets, args.max_images, temperature=tau)
        result["taus"][str(tau)] = split_metrics(rep)
    if not args.no_data_quality:
        data = prov.get("data", {})
        retrieval = Path(data["retrieval_stage"]) / "retrieval.json"
        mask_dir = data.get("masks", {}).get("pseudo_mask_dir")
        truth = Path(config["data"]["index_dirs"][0]).parent / "truth" / "instances.json"
        result["training_data"] = training_data_quality(retrieval, Path(mask_dir) if mask_dir else None, truth,
                                                        config["vocabulary"])
    result["report_seconds"] = round(time.perf_counter() - start, 1)

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    print(f"| split | AP | AP50 | AP75 | mIoU |  ({result['num_images']} scenes, tau {meta.inference.temperature})")
    print("|---|---|---|---|---|")
    for split, m in result["main"].items():
        print(f"| {split} | {fmt(m['AP'])} | {fmt(m['AP50'])} | {fmt(m['AP75'])} | {fmt(m['mIoU'])} |")
    for tau, metrics in result["taus"].items():
        print(f"tau {tau}: " + ", ".join(f"{s} AP50 {fmt(m['AP50'])} mIoU {fmt(m['mIoU'])}"
                                         for s, m in metrics.items()))
    if "training_data" in result:
        print(json.dumps(result["training_data"]))
    write_json_report(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
