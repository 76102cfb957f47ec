"""Export: a trained network as the service's checkpoint, its score threshold chosen on validation scenes and
its metrics measured on test scenes, both stored in the checkpoint's provenance."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from model.checkpoint import CheckpointMetadata, save_checkpoint
from model.config import InferenceParams
from model.training.config import EXPORT_DTYPES, EvalConfig, TrainConfig
from model.training.evaluation.coco_ap import evaluate_instances
from model.training.evaluation.datasets import load_coco_dataset, load_label_folder_dataset
from model.training.evaluation.runner import evaluate_checkpoint
from model.training.operating_point import choose_score_threshold, match_detections, operating_points


def export(path: Path, model: torch.nn.Module, text_tower: torch.nn.Module, cfg: TrainConfig,
           provenance: dict[str, Any], device: torch.device, log: Callable[[str], None]) -> Path:
    """Write the service checkpoint; with a ``val`` set, choose its score threshold there
    (``model.training.operating_point``); with an ``eval`` set, evaluate it and store the metrics (and timings) in
    its provenance."""
    metadata = CheckpointMetadata(model_id=path.stem if cfg.export_path else (path.parent.name or "zutis"),
                                  model_config=cfg.model,
                                  vocabulary=["background", *(cfg.export_vocabulary or cfg.vocabulary)],
                                  inference=InferenceParams.from_dict(cfg.inference), provenance=provenance,
                                  trained_concepts=list(cfg.vocabulary))
    timings = provenance.setdefault("timings_seconds", {})

    def save() -> None:
        save_checkpoint(path, model, text_tower, metadata, dtype=EXPORT_DTYPES[cfg.export_dtype])

    def load(e: EvalConfig) -> Any:
        return load_coco_dataset(e.annotations, e.image_dir, e.label_dir) if e.annotations else \
            load_label_folder_dataset(e.image_dir, e.label_dir, cfg.export_vocabulary or cfg.vocabulary)

    save()
    if cfg.val is not None:
        start = time.monotonic()
        val = load(cfg.val)
        log(f"choosing the score threshold on {len(val)} validation images")
        # one pass with the lowest candidate as floor; higher floors only drop detections (operating_point)
        run = evaluate_checkpoint(path, val, device=str(device), max_images=cfg.val.max_images,
                                  score_threshold=0.001)
        threshold, points = choose_score_threshold(first_images(val.coco, cfg.val.max_images), run.results)
        metadata.inference = metadata.inference.with_overrides(score_threshold=threshold)
        metadata.provenance["score_threshold"] = {
            "chosen": threshold, "criterion": "max instance F1 at mask IoU 0.5", "val_images": run.report["num_images"],
            "val_dir": cfg.val.image_dir, "points": points}
        timings["choose_threshold"] = round(time.monotonic() - start, 1)
        log(f"score threshold {threshold} (val F1 {max(p['f1'] for p in points):.3f})")
        save()
    if cfg.eval is not None:
        start = time.monotonic()
        e = cfg.eval
        dataset = load(e)
        log(f"evaluating {path} on {len(dataset)} images")
        overrides = {} if e.score_threshold is None else {"score_threshold": e.score_threshold}
        evaluation = evaluate_checkpoint(path, dataset, device=str(device), max_images=e.max_images,
                                         subsets=e.subsets, **overrides)
        report = dict(evaluation.report)
        report.pop("concepts", None)
        for subset in report.get("subsets", {}).values():
            subset.pop("concepts", None)
        if e.class_agnostic and dataset.coco is not None:
            report["class_agnostic"] = evaluate_instances(
                dataset.coco, evaluation.results, class_agnostic=True,
                image_ids=[s.image_id for s in dataset.samples[:e.max_images]])
        if dataset.coco is not None:
            report["operating_point"] = operating_points(*match_detections(first_images(dataset.coco, e.max_images),
                                                                             evaluation.results),
                                                         [metadata.inference.score_threshold])[0]
        metadata.provenance["metrics"] = report
        timings["evaluate"] = round(time.monotonic() - start, 1)
        save()
        log("metrics: " + json.dumps(report, default=str)[:2000])
    return path


def first_images(coco: dict[str, Any], max_images: int | None) -> dict[str, Any]:
    """The COCO dataset restricted to its first ``max_images`` images (the ones an evaluation with ``max_images``
    predicted), so that recall is counted over the objects of those images only; all of it for None."""
    if max_images is None:
        return coco
    images = coco["images"][:max_images]
    ids = {im["id"] for im in images}
    return {**coco, "images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}


__all__ = ["export", "first_images"]
