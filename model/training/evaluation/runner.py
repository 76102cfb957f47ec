"""Running a model over an evaluation dataset and turning what it predicted into the JSON report.

``evaluate_checkpoint`` loads a ``model.predictor.Predictor``; ``evaluate_predictor`` runs any object with its
``predict(images, concepts, **overrides)`` over a dataset, collects COCO results and a semantic confusion matrix
in the dataset's classes, and ``score`` turns those into the report (COCO mask AP from ``coco_ap``, mIoU from
``semantic``, overall and per concept subset). ``format_report`` is the report as a plain-text table.

``model.predictor`` is imported by ``evaluate_checkpoint`` only: it brings torch and open_clip, which scoring a
results file or running a predictor handed in does not need.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.answer import segmentation_to_rle
from model.training.evaluation.coco_ap import evaluate_instances
from model.training.evaluation.datasets import EvalDataset, EvalSample, load_label_map, read_image
from model.training.evaluation.semantic import ConfusionMatrix, as_int_array, semantic_report


@dataclass
class Evaluation:
    """The report (JSON-ready) and the raw COCO results the model produced (empty without COCO GT)."""

    report: dict[str, Any]
    results: list[dict[str, Any]]


class ProgressReporter:
    """Progress of ``total`` items on ``stream``: one line rewritten in place on a terminal; on anything else (a log
    file, a pipe) whole lines, about every 5% and at the end, each with the elapsed time."""

    def __init__(self, total: int, stream: Any) -> None:
        self.total = total
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.step = max(1, total // 20)
        self.start = time.perf_counter()
        self.last = 0

    def __call__(self, done: int) -> None:
        elapsed = time.perf_counter() - self.start
        if self.tty:
            print(f"\r{done}/{self.total} images ({elapsed:.0f} s)", end="", file=self.stream, flush=True)
        elif done == self.total or done - self.last >= self.step:
            print(f"{done}/{self.total} images ({elapsed:.1f} s)", file=self.stream, flush=True)
            self.last = done

    def close(self) -> None:
        """End the in-place line on a terminal."""
        if self.tty:
            print(file=self.stream, flush=True)


def evaluate_checkpoint(checkpoint: str | Path, dataset: EvalDataset, concepts: Sequence[str] | None = None, *,
                        device: str = "cpu", geometry: str | None = None, input_size: int | None = None,
                        dtype: str = "auto", runtime: str = "torch", **kwargs: Any) -> Evaluation:
    """Load ``checkpoint`` with ``model.predictor.Predictor`` and run ``evaluate_predictor`` with it.

    ``geometry`` (``letterbox``/``native``) and ``input_size`` default to the checkpoint's; ``dtype`` and
    ``runtime`` are ``Predictor.from_checkpoint``'s.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    from model.predictor import Predictor  # deferred: torch and open_clip (see the module docstring)

    predictor = Predictor.from_checkpoint(checkpoint, device=device, input_size=input_size, geometry=geometry,
                                          dtype=dtype, runtime=runtime)
    return evaluate_predictor(predictor, dataset, concepts, **kwargs)


def evaluate_predictor(predictor: Any, dataset: EvalDataset, concepts: Sequence[str] | None = None, *,
                       class_agnostic: bool = False, subsets: Mapping[str, Sequence[str]] | None = None,
                       batch_size: int = 1, max_images: int | None = None, progress: bool = False,
                       exif_orientation: bool = True, **overrides: Any) -> Evaluation:
    """Predict every image of ``dataset`` with ``predictor.predict(images, concepts, **overrides)`` and score it.

    ``concepts`` (default: all of ``dataset.class_names``) is the vocabulary given to the model; each must be a
    dataset class name. Concept k of a ``Prediction`` (k >= 1) is mapped to that class's COCO category id and
    semantic class index. Instance AP is computed when the dataset has COCO GT, semantic metrics when it has label
    maps. ``subsets`` ({"unseen": [names]}) adds AP and mIoU over those classes only (no background).
    Images are turned upright by their EXIF orientation unless ``exif_orientation`` is False (then the ground
    truth must be in the stored pixel grid); ``progress`` writes progress to stderr (see ``ProgressReporter``).
    The report is ``score``'s plus ``seconds`` and ``seconds_per_image`` (wall time of the prediction loop).
    """
    concepts = list(dataset.class_names if concepts is None else concepts)
    lut = _vocabulary_to_classes(dataset, concepts, subsets)
    samples = list(dataset.samples[:max_images] if max_images is not None else dataset.samples)
    has_labels = bool(samples) and all(s.label_path is not None for s in samples)
    matrix = ConfusionMatrix(len(dataset.class_names) + 1)
    results: list[dict[str, Any]] = []
    step = max(1, int(batch_size))
    start = time.perf_counter()
    report_progress = ProgressReporter(len(samples), sys.stderr) if progress else None
    for first in range(0, len(samples), step):
        batch = samples[first:first + step]
        images, predictions = _predict_batch(predictor, dataset, batch, concepts, exif_orientation, overrides)
        for sample, image, pred in zip(batch, images, predictions, strict=True):
            _check_prediction(pred, sample, image, len(concepts))
            if dataset.coco is not None:
                results.extend(_coco_results(pred, sample, dataset.category_ids, lut))
            if has_labels:
                matrix.update(_semantic_in_classes(pred, lut), load_label_map(sample.label_path))
        if report_progress is not None:
            report_progress(first + len(batch))
    if report_progress is not None:
        report_progress.close()
    seconds = time.perf_counter() - start

    report = score(dataset, results if dataset.coco is not None else None, matrix if has_labels else None,
                   concepts, class_agnostic=class_agnostic, subsets=subsets,
                   image_ids=[s.image_id for s in samples], semantic_class_ids=lut.tolist())
    report.update(seconds=seconds, seconds_per_image=seconds / max(1, len(samples)))
    return Evaluation(report, results)


def _vocabulary_to_classes(dataset: EvalDataset, concepts: Sequence[str],
                           subsets: Mapping[str, Sequence[str]] | None) -> np.ndarray:
    """``(len(concepts) + 1,)`` int64: vocabulary index (0 = background) -> dataset class index (0 = background).

    Every concept and subset member must be a dataset class name, and the concepts distinct.
    """
    class_of = {name: k + 1 for k, name in enumerate(dataset.class_names)}
    unknown = [c for c in list(concepts) + [c for s in (subsets or {}).values() for c in s] if c not in class_of]
    if unknown:
        raise ValueError(f"concepts {unknown} are not classes of the dataset")
    if len(set(concepts)) != len(concepts):
        raise ValueError("concepts contain duplicates")
    return np.array([0] + [class_of[c] for c in concepts], dtype=np.int64)


def _predict_batch(predictor: Any, dataset: EvalDataset, batch: Sequence[EvalSample], concepts: list[str],
                   exif_orientation: bool, overrides: Mapping[str, Any]) -> tuple[list[Any], Sequence[Any]]:
    """The batch's images as read (RGB PIL, upright unless ``exif_orientation`` is False; each checked against the
    size its COCO entry records) and the predictor's predictions for them, one per image."""
    images = [read_image(s.image_path, exif_orientation) for s in batch]
    if dataset.coco is not None:
        for sample, image in zip(batch, images, strict=True):
            _check_annotated_size(dataset.coco, sample, image, exif_orientation)
    return images, predictor.predict(images, concepts, **overrides)


def _field(obj: Any, name: str) -> Any:
    """``obj[name]`` of a mapping, ``obj.name`` of anything else (a ``Prediction`` or its JSON form)."""
    return obj[name] if isinstance(obj, Mapping) else getattr(obj, name)


def _check_annotated_size(coco: Mapping[str, Any], sample: EvalSample, image: Any, exif_orientation: bool) -> None:
    """The image as read must have the size its COCO entry records (when it records one)."""
    entry = next((img for img in coco["images"] if img["id"] == sample.image_id), None)
    if entry is None or "width" not in entry or "height" not in entry:
        return
    if (int(entry["width"]), int(entry["height"])) != (image.width, image.height):
        hint = ("; the annotations may be in the stored pixel grid: try --no-exif-orientation" if exif_orientation
                else "; the annotations may be in the upright frame: drop --no-exif-orientation")
        raise ValueError(f"image {sample.image_path} is {image.width}x{image.height} as read but its COCO entry says "
                         f"{entry['width']}x{entry['height']}{hint}")


def _check_prediction(pred: Any, sample: EvalSample, image: Any, num_concepts: int) -> None:
    """A prediction must name every concept plus background and have the size of the image it was made for."""
    if len(_field(pred, "concepts")) != num_concepts + 1:
        raise ValueError(f"the predictor returned {len(_field(pred, 'concepts'))} concepts for "
                         f"{num_concepts} + background; are some concepts equal after normalisation?")
    if tuple(_field(pred, "image_hw")) != (image.height, image.width):
        raise ValueError(f"prediction size {tuple(_field(pred, 'image_hw'))} differs from image "
                         f"{sample.image_path} size {(image.height, image.width)}")


def _coco_results(pred: Any, sample: EvalSample, category_ids: Sequence[int], lut: np.ndarray) -> list[dict[str, Any]]:
    """The prediction's instances as COCO results of ``sample``: ``image_id``, the ``category_id`` of the instance's
    concept (``lut`` maps vocabulary to dataset class), ``segmentation`` (RLE, ``counts`` a str; an instance's
    polygons are rasterised to it) and ``score``."""
    num_concepts = len(lut) - 1
    results = []
    for inst in _field(pred, "instances"):
        k = int(_field(inst, "concept_index"))
        if not 1 <= k <= num_concepts:
            raise ValueError(f"instance concept_index {k} is not a user concept (1..{num_concepts})")
        # RLE or polygons (a JSON answer of mask_format=polygon), as COCO RLE: model.answer reads both
        rle = segmentation_to_rle(_field(inst, "segmentation"), tuple(_field(pred, "image_hw")))
        results.append({"image_id": sample.image_id, "category_id": category_ids[lut[k] - 1],
                        "segmentation": rle, "score": float(_field(inst, "score"))})
    return results


def _semantic_in_classes(pred: Any, lut: np.ndarray) -> np.ndarray:
    """The prediction's ``(H, W)`` semantic map (vocabulary indices) as dataset class indices, int64."""
    if _field(pred, "semantic") is None:
        raise ValueError("the dataset has label maps but the predictor returned no semantic map")
    return lut[as_int_array(_field(pred, "semantic"))]


def score(dataset: EvalDataset, results: Sequence[Mapping[str, Any]] | None, matrix: ConfusionMatrix | None,
          concepts: Sequence[str], *, class_agnostic: bool = False,
          subsets: Mapping[str, Sequence[str]] | None = None, image_ids: Sequence[Any] | None = None,
          semantic_class_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """The JSON report for COCO ``results`` and/or a semantic ``matrix`` (either may be None) over ``concepts``.

    ``{"num_images", "concepts", "class_agnostic", "instances", "semantic", "subsets": {name: {"concepts",
    "instances", "semantic"}}}``: ``instances`` is an ``evaluate_instances`` report, ``semantic`` a
    ``semantic_report``, None where not measured. ``semantic_class_ids`` restricts the overall mIoU (default: every
    class); subset mIoUs exclude background.
    """
    class_of = {name: k + 1 for k, name in enumerate(dataset.class_names)}

    def cat_ids(names: Sequence[str]) -> list[int]:
        return [dataset.category_ids[class_of[n] - 1] for n in names]

    report: dict[str, Any] = {"num_images": len(image_ids) if image_ids is not None else len(dataset),
                              "concepts": list(concepts), "class_agnostic": class_agnostic,
                              "instances": None, "semantic": None, "subsets": {}}
    if results is not None:
        if dataset.coco is None:
            raise ValueError("instance results need a COCO ground truth")
        report["instances"] = evaluate_instances(dataset.coco, results, class_agnostic, cat_ids(concepts), image_ids)
    if matrix is not None:
        report["semantic"] = semantic_report(matrix, semantic_class_ids)
    for name, members in (subsets or {}).items():
        unknown = [c for c in members if c not in class_of]
        if unknown:
            raise ValueError(f"subset {name!r}: {unknown} are not classes of the dataset")
        report["subsets"][name] = {
            "concepts": list(members),
            "instances": None if results is None else evaluate_instances(dataset.coco, results, class_agnostic,
                                                                         cat_ids(members), image_ids),
            "semantic": None if matrix is None else semantic_report(matrix, [class_of[c] for c in members]),
        }
    return report


def format_report(report: Mapping[str, Any]) -> str:
    """A plain-text table: mask AP / AP50 / AP75, mIoU and pixel accuracy for all concepts and each subset."""
    columns = {"all": report} | dict(report.get("subsets", {}))
    rows = [("mask AP", "instances", "AP"), ("mask AP50", "instances", "AP50"), ("mask AP75", "instances", "AP75"),
            ("mIoU", "semantic", "mIoU"), ("pixel acc", "semantic", "pixel_accuracy")]
    lines = [f"{'metric':<12}" + "".join(f"{name:>12}" for name in columns)]
    for label, section, key in rows:
        if all(col.get(section) is None for col in columns.values()):
            continue
        cells = []
        for col in columns.values():
            value = (col.get(section) or {}).get(key)
            cells.append(f"{value:>12.2f}" if value is not None else f"{'-':>12}")
        lines.append(f"{label:<12}" + "".join(cells))
    return "\n".join(lines)


__all__ = ["Evaluation", "ProgressReporter", "evaluate_checkpoint", "evaluate_predictor", "score", "format_report"]
