"""Evaluation: COCO mask AP (pycocotools ``COCOeval``, ``iouType="segm"``) and semantic mIoU / pixel accuracy.

Metrics follow the official ZUTIS evaluation (reference §6.1):

- instances: category-aware ``COCOeval`` on masks with maxDets [1, 10, 100]; AP, AP50, AP75 reported as
  percentages (0-100). ``class_agnostic=True`` maps every category, in GT and results alike, to one.
- semantic: one confusion matrix accumulated over the whole split; GT labels outside ``[0, num_classes)`` (255,
  1000, ...) are ignored; mIoU is the nanmean over classes of TP / (TP + FP + FN), classes absent from both GT and
  prediction being NaN and excluded; background (class 0) counts as a class.

Datasets on disk are either a COCO JSON + image folder (optionally with a folder of label PNGs for semantic GT),
or an image folder + a label-PNG folder (PNG value = class index, 255 = ignore). ``evaluate_checkpoint`` runs a
``model.predictor.Predictor`` over one; ``python -m model.evaluate`` is its command line and can also score an
existing COCO results file. Report values that are undefined (no GT for that metric) are ``None``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from model.training.files import IMAGE_SUFFIXES, is_image_file

logger = logging.getLogger(__name__)

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _percent(value: float) -> float | None:
    """A fraction in [0, 1] as a percentage; pycocotools' -1 and NaN (undefined) become None."""
    value = float(value)
    return None if math.isnan(value) or value < 0 else 100.0 * value


@contextlib.contextmanager
def _quiet_pycocotools() -> Iterator[None]:
    """Send pycocotools' progress prints to the debug log instead of stdout."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    if buffer.getvalue().strip():
        logger.debug("pycocotools: %s", buffer.getvalue().strip())


# ---------------------------------------------------------------------------------------------------------------
# Instance segmentation: COCO mask AP
# ---------------------------------------------------------------------------------------------------------------
def load_coco_json(gt: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """Read (or copy) a COCO instances dataset: a dict with ``images``, ``annotations`` and ``categories``."""
    if isinstance(gt, (str, Path)):
        path = Path(gt)
        if not path.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {path}")
        with path.open() as f:
            gt = json.load(f)
    if not isinstance(gt, Mapping):
        raise ValueError("COCO ground truth must be a JSON object")
    missing = [k for k in ("images", "annotations", "categories") if k not in gt]
    if missing:
        raise ValueError(f"COCO ground truth lacks the key(s) {missing}")
    return {"images": list(gt["images"]), "annotations": list(gt["annotations"]),
            "categories": list(gt["categories"])}


def evaluate_instances(gt: Mapping[str, Any] | str | Path, results: Sequence[Mapping[str, Any]],
                       class_agnostic: bool = False, category_ids: Sequence[int] | None = None,
                       image_ids: Sequence[Any] | None = None) -> dict[str, Any]:
    """COCO mask AP of ``results`` against ``gt`` (pycocotools ``COCOeval``, ``iouType="segm"``).

    Args:
        gt: a COCO instances dataset (dict or JSON path). Images need ``id``, ``height``, ``width``; annotations
            need ``image_id``, ``category_id``, ``segmentation`` (polygons or RLE); ``area``, ``iscrowd`` and ``id``
            are filled in when absent.
        results: COCO results, one dict per predicted instance: ``image_id``, ``category_id``, ``score`` and
            ``segmentation`` = RLE ``{"size": [H, W], "counts": str | bytes}``. May be empty (AP is then 0).
        class_agnostic: map every category of GT and results to a single one before evaluating.
        category_ids: evaluate only these categories (e.g. the unseen ones). Category-aware, this sets
            ``params.catIds``; class-agnostic, GT annotations and results of other categories are dropped first.
        image_ids: evaluate only these images (default: all images of ``gt``).

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}`` as
        percentages (None where undefined), ``per_category`` {category id: {"name", "AP", "AP50", "num_gt"}},
        ``num_images``, ``num_gt``, ``num_results``, ``class_agnostic`` and ``category_ids``.
    """
    from pycocotools.cocoeval import COCOeval

    dataset = load_coco_json(gt)
    images = {img["id"]: img for img in dataset["images"]}
    known_cats = {cat["id"]: cat.get("name", str(cat["id"])) for cat in dataset["categories"]}
    if category_ids is None:
        category_ids = sorted(known_cats)
    else:
        category_ids = [int(c) for c in category_ids]
        unknown = sorted(set(category_ids) - set(known_cats))
        if unknown:
            raise ValueError(f"category_ids {unknown} are not categories of the ground truth")
    if image_ids is None:
        image_ids = sorted(images)
    else:
        unknown = [i for i in image_ids if i not in images]
        if unknown:
            raise ValueError(f"image_ids {unknown[:5]} are not images of the ground truth")
        image_ids = list(image_ids)

    gt_anns = [_complete_gt_annotation(ann, k, images) for k, ann in enumerate(dataset["annotations"])]
    if len({a["id"] for a in gt_anns}) != len(gt_anns):
        raise ValueError("GT annotation ids are not unique")
    dt_anns = [_check_result(res, k, images, known_cats) for k, res in enumerate(results)]
    categories = dataset["categories"]
    eval_cat_ids = list(category_ids)
    if class_agnostic:
        keep = set(category_ids)
        gt_anns = [dict(a, category_id=1) for a in gt_anns if a["category_id"] in keep]
        dt_anns = [dict(a, category_id=1) for a in dt_anns if a["category_id"] in keep]
        categories = [{"id": 1, "name": "object"}]
        eval_cat_ids = [1]

    coco_gt = _build_coco({"images": dataset["images"], "annotations": gt_anns, "categories": categories})
    # Built by hand rather than with COCO.loadRes, which crashes on an empty result list.
    coco_dt = _build_coco({"images": dataset["images"], "annotations": dt_anns, "categories": categories})
    with _quiet_pycocotools():
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.params.catIds = eval_cat_ids
        evaluator.params.imgIds = image_ids
        evaluator.params.maxDets = [1, 10, 100]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    report: dict[str, Any] = {name: _percent(v) for name, v in zip(STAT_NAMES, evaluator.stats)}
    # precision: [T iou thresholds, R recall thresholds, K categories, A area ranges, M maxDets]
    precision = evaluator.eval["precision"]
    image_set = set(image_ids)
    gt_counts = Counter(a["category_id"] for a in gt_anns if a["image_id"] in image_set and not a["iscrowd"])
    per_category = {}
    for k, cat_id in enumerate(eval_cat_ids):
        p_all, p_50 = precision[:, :, k, 0, -1], precision[0, :, k, 0, -1]
        per_category[cat_id] = {
            "name": "object" if class_agnostic else known_cats[cat_id],
            "AP": _percent(p_all[p_all > -1].mean()) if (p_all > -1).any() else None,
            "AP50": _percent(p_50[p_50 > -1].mean()) if (p_50 > -1).any() else None,
            "num_gt": gt_counts[cat_id],
        }
    report.update(per_category=per_category, num_images=len(image_ids), class_agnostic=class_agnostic,
                  category_ids=list(category_ids),
                  num_gt=sum(c["num_gt"] for c in per_category.values()),
                  num_results=sum(1 for a in dt_anns if a["image_id"] in image_set
                                  and a["category_id"] in eval_cat_ids))
    return report


def _build_coco(dataset: dict[str, Any]) -> Any:
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with _quiet_pycocotools():
        coco.createIndex()
    return coco


def _complete_gt_annotation(ann: Mapping[str, Any], k: int, images: Mapping[Any, Any]) -> dict[str, Any]:
    """Fill ``id``, ``iscrowd`` and ``area`` (which COCOeval needs) into a GT annotation."""
    from pycocotools import mask as mask_utils

    for key in ("image_id", "category_id", "segmentation"):
        if key not in ann:
            raise ValueError(f"GT annotation #{k} lacks '{key}'")
    if ann["image_id"] not in images:
        raise ValueError(f"GT annotation #{k} refers to unknown image_id {ann['image_id']!r}")
    out = dict(ann)
    out.setdefault("id", k + 1)
    out["iscrowd"] = int(out.get("iscrowd", 0))
    if "area" not in out:
        img = images[ann["image_id"]]
        segm = ann["segmentation"]
        if isinstance(segm, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segm, img["height"], img["width"]))
        elif isinstance(segm.get("counts"), list):
            rle = mask_utils.frPyObjects(segm, img["height"], img["width"])
        else:
            rle = segm
        out["area"] = float(mask_utils.area(rle))
    return out


def _check_result(res: Mapping[str, Any], k: int, images: Mapping[Any, Any],
                  categories: Mapping[int, str]) -> dict[str, Any]:
    """Validate one COCO result and add what COCOeval reads (``id``, ``area``, ``bbox``, ``iscrowd``)."""
    from pycocotools import mask as mask_utils

    for key in ("image_id", "category_id", "segmentation", "score"):
        if key not in res:
            raise ValueError(f"result #{k} lacks '{key}'")
    if res["image_id"] not in images:
        raise ValueError(f"result #{k} refers to image_id {res['image_id']!r}, which is not in the ground truth")
    if res["category_id"] not in categories:
        raise ValueError(f"result #{k} has category_id {res['category_id']!r}, not a ground-truth category")
    segm = res["segmentation"]
    if not isinstance(segm, Mapping) or "size" not in segm or not isinstance(segm.get("counts"), (str, bytes)):
        raise ValueError(f"result #{k}: segmentation must be a compressed RLE {{'size': [H, W], 'counts': str}}")
    img = images[res["image_id"]]
    if "height" in img and list(segm["size"]) != [img["height"], img["width"]]:
        raise ValueError(f"result #{k}: mask size {list(segm['size'])} differs from image {res['image_id']!r} "
                         f"size {[img['height'], img['width']]}")
    rle = {"size": list(segm["size"]), "counts": segm["counts"]}
    return {"id": k + 1, "image_id": res["image_id"], "category_id": res["category_id"],
            "score": float(res["score"]), "segmentation": rle, "area": float(mask_utils.area(rle)),
            "bbox": mask_utils.toBbox(rle).tolist(), "iscrowd": 0}


# ---------------------------------------------------------------------------------------------------------------
# Semantic segmentation: confusion matrix, mIoU, pixel accuracy
# ---------------------------------------------------------------------------------------------------------------
def _as_int_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on an accelerator; torch itself is not imported here
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
        raise ValueError(f"label maps must be integer arrays, got dtype {x.dtype}")
    return x.astype(np.int64, copy=False)


class ConfusionMatrix:
    """A ``(num_classes, num_classes)`` int64 confusion matrix accumulated over label maps: rows GT, columns prediction.

    GT pixels equal to ``ignore_index`` or outside ``[0, num_classes)`` are ignored. Ratios are fractions in [0, 1].
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred: Any, gt: Any) -> None:
        """Add one pair of integer label maps of the same shape (numpy or torch, any integer dtype)."""
        pred, gt = _as_int_array(pred), _as_int_array(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from GT shape {gt.shape}")
        valid = (gt >= 0) & (gt < self.num_classes) & (gt != self.ignore_index)
        pred, gt = pred[valid], gt[valid]
        if pred.size and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"predicted labels must lie in [0, {self.num_classes}), got "
                             f"[{pred.min()}, {pred.max()}]")
        n = self.num_classes
        self.matrix += np.bincount(n * gt + pred, minlength=n * n).reshape(n, n)

    def per_class_iou(self) -> np.ndarray:
        """(num_classes,) float64 TP / (TP + FP + FN); NaN for classes absent from both GT and prediction."""
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(axis=0) + self.matrix.sum(axis=1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def miou(self, class_ids: Sequence[int] | None = None) -> float:
        """Mean IoU over ``class_ids`` (default all) ignoring NaN classes; NaN if every one of them is NaN."""
        iou = self.per_class_iou()
        if class_ids is not None:
            class_ids = list(class_ids)
            bad = [c for c in class_ids if not 0 <= c < self.num_classes]
            if bad:
                raise ValueError(f"class_ids {bad} are outside [0, {self.num_classes})")
            iou = iou[class_ids]
        iou = iou[~np.isnan(iou)]
        return float(iou.mean()) if iou.size else math.nan

    def pixel_accuracy(self) -> float:
        """Correct pixels / counted pixels; NaN when no pixel was counted."""
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else math.nan


def semantic_report(matrix: ConfusionMatrix, class_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """``{"mIoU", "pixel_accuracy", "per_class_iou", "num_classes", "num_pixels", "class_ids"}``, in percent."""
    return {
        "mIoU": _percent(matrix.miou(class_ids)),
        "pixel_accuracy": _percent(matrix.pixel_accuracy()),
        "per_class_iou": [_percent(v) for v in matrix.per_class_iou()],
        "num_classes": matrix.num_classes,
        "num_pixels": int(matrix.matrix.sum()),
        "class_ids": None if class_ids is None else list(class_ids),
    }


def evaluate_semantic(pairs: Iterable[tuple[Any, Any]], num_classes: int, ignore_index: int = 255,
                      class_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """mIoU and pixel accuracy (percent) over ``(pred, gt)`` label-map pairs; see ``semantic_report``.

    ``class_ids`` restricts the mIoU mean to those classes (e.g. the unseen ones); pixel accuracy always counts
    every non-ignored pixel.
    """
    matrix = ConfusionMatrix(num_classes, ignore_index)
    for pred, gt in pairs:
        matrix.update(pred, gt)
    return semantic_report(matrix, class_ids)


# ---------------------------------------------------------------------------------------------------------------
# Datasets on disk
# ---------------------------------------------------------------------------------------------------------------
class EvalSample(NamedTuple):
    """One image: its id, file, COCO annotations (empty for label-folder datasets) and label PNG (or None)."""

    image_id: Any
    image_path: Path
    annotations: list[dict[str, Any]]
    label_path: Path | None


@dataclass(frozen=True)
class EvalDataset:
    """Images with GT. Class index k (1-based) of the semantic labels is concept ``class_names[k - 1]``; 0 is
    background. ``category_ids[k - 1]`` is its COCO category id; ``coco`` is the COCO dataset, or None."""

    samples: tuple[EvalSample, ...]
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...] = ()
    coco: dict[str, Any] | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[EvalSample]:
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)


def load_label_map(path: str | Path) -> np.ndarray:
    """A label PNG as an (H, W) integer array of class indices (palette PNGs give their indices)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label map not found: {path}")
    with Image.open(path) as img:
        if img.mode not in ("P", "L", "I", "I;16", "1"):
            raise ValueError(f"{path}: label maps must be single-channel PNGs (mode P, L or I), got mode {img.mode}")
        return np.array(img).astype(np.int64)


def _find_label(label_dir: Path, stems: Sequence[str]) -> Path:
    for stem in stems:
        candidate = label_dir / f"{stem}.png"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no label map {' or '.join(f'{s}.png' for s in stems)} in {label_dir}")


def load_coco_dataset(annotations: str | Path, image_dir: str | Path,
                      label_dir: str | Path | None = None) -> EvalDataset:
    """A COCO JSON + image folder; with ``label_dir``, also semantic GT PNGs named after the image file's stem or,
    failing that, the image id (``{id}.png``, as COCO2017's rendered semantic masks). Classes are the categories
    sorted by id (class k = k-th category, 0 = background)."""
    coco = load_coco_json(annotations)
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    label_root = None if label_dir is None else Path(label_dir)
    if label_root is not None and not label_root.is_dir():
        raise FileNotFoundError(f"label folder not found: {label_root}")
    by_image: dict[Any, list[dict[str, Any]]] = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    samples = []
    for img in coco["images"]:
        path = image_dir / img["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image {img['file_name']!r} (id {img['id']!r}) not found in {image_dir}")
        label = None if label_root is None else _find_label(label_root, [Path(img["file_name"]).stem, str(img["id"])])
        samples.append(EvalSample(img["id"], path, by_image[img["id"]], label))
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    return EvalDataset(tuple(samples), tuple(c["name"] for c in cats), tuple(c["id"] for c in cats), coco)


def load_label_folder_dataset(image_dir: str | Path, label_dir: str | Path,
                              class_names: Sequence[str]) -> EvalDataset:
    """An image folder + label-PNG folder (same stem; value k = ``class_names[k - 1]``, 0 background, 255 ignore)."""
    image_dir, label_dir = Path(image_dir), Path(label_dir)
    for d in (image_dir, label_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"folder not found: {d}")
    if not class_names:
        raise ValueError("a label-folder dataset needs its class names (class 1 onwards)")
    images = sorted(p for p in image_dir.iterdir() if is_image_file(p))
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
    samples = tuple(EvalSample(p.stem, p, [], _find_label(label_dir, [p.stem])) for p in images)
    return EvalDataset(samples, tuple(class_names))


# ---------------------------------------------------------------------------------------------------------------
# Running a model
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """The report (JSON-ready) and the raw COCO results the model produced (empty without COCO GT)."""

    report: dict[str, Any]
    results: list[dict[str, Any]]


def _field(obj: Any, name: str) -> Any:
    return obj[name] if isinstance(obj, Mapping) else getattr(obj, name)


def read_image(path: Path, exif_orientation: bool = True) -> Any:
    """An image file as an RGB PIL image: the first picture of multi-picture files, upright by its EXIF
    orientation unless ``exif_orientation`` is False."""
    from PIL import Image

    from model.orientation import apply_exif_orientation

    with Image.open(path) as img:
        img.load()
        upright = apply_exif_orientation(img) if exif_orientation else img
        return upright.convert("RGB")


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
                        **kwargs: Any) -> Evaluation:
    """Load ``checkpoint`` with ``model.predictor.Predictor`` and run ``evaluate_predictor`` with it.

    ``geometry`` (``letterbox``/``native``) and ``input_size`` default to the checkpoint's.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    from model.predictor import Predictor

    predictor = Predictor.from_checkpoint(checkpoint, device=device, input_size=input_size, geometry=geometry)
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
    """
    concepts = list(dataset.class_names if concepts is None else concepts)
    class_of = {name: k + 1 for k, name in enumerate(dataset.class_names)}
    unknown = [c for c in concepts + [c for s in (subsets or {}).values() for c in s] if c not in class_of]
    if unknown:
        raise ValueError(f"concepts {unknown} are not classes of the dataset")
    if len(set(concepts)) != len(concepts):
        raise ValueError("concepts contain duplicates")
    # vocabulary index (0 = background) -> dataset class index
    lut = np.array([0] + [class_of[c] for c in concepts], dtype=np.int64)
    samples = list(dataset.samples[:max_images] if max_images is not None else dataset.samples)
    has_labels = bool(samples) and all(s.label_path is not None for s in samples)
    matrix = ConfusionMatrix(len(dataset.class_names) + 1)
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    report_progress = ProgressReporter(len(samples), sys.stderr) if progress else None
    for first in range(0, len(samples), max(1, int(batch_size))):
        batch = samples[first:first + max(1, int(batch_size))]
        images = [read_image(s.image_path, exif_orientation) for s in batch]
        if dataset.coco is not None:
            for sample, image in zip(batch, images, strict=True):
                _check_annotated_size(dataset.coco, sample, image, exif_orientation)
        predictions = predictor.predict(images, concepts, **overrides)
        for sample, image, pred in zip(batch, images, predictions, strict=True):
            if len(_field(pred, "concepts")) != len(concepts) + 1:
                raise ValueError(f"the predictor returned {len(_field(pred, 'concepts'))} concepts for "
                                 f"{len(concepts)} + background; are some concepts equal after normalisation?")
            if tuple(_field(pred, "image_hw")) != (image.height, image.width):
                raise ValueError(f"prediction size {tuple(_field(pred, 'image_hw'))} differs from image "
                                 f"{sample.image_path} size {(image.height, image.width)}")
            if dataset.coco is not None:
                for inst in _field(pred, "instances"):
                    k = int(_field(inst, "concept_index"))
                    if not 1 <= k <= len(concepts):
                        raise ValueError(f"instance concept_index {k} is not a user concept (1..{len(concepts)})")
                    rle = _field(inst, "segmentation")
                    counts = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
                    results.append({"image_id": sample.image_id, "category_id": dataset.category_ids[lut[k] - 1],
                                    "segmentation": {"size": list(rle["size"]), "counts": counts},
                                    "score": float(_field(inst, "score"))})
            if has_labels:
                if _field(pred, "semantic") is None:
                    raise ValueError("the dataset has label maps but the predictor returned no semantic map")
                matrix.update(lut[_as_int_array(_field(pred, "semantic"))], load_label_map(sample.label_path))
        if report_progress is not None:
            report_progress(first + len(batch))
    if report_progress is not None:
        report_progress.close()
    seconds = time.perf_counter() - start

    vocab_classes = [0] + [class_of[c] for c in concepts]
    report = score(dataset, results if dataset.coco is not None else None, matrix if has_labels else None,
                   concepts, class_agnostic=class_agnostic, subsets=subsets,
                   image_ids=[s.image_id for s in samples], semantic_class_ids=vocab_classes)
    report.update(seconds=seconds, seconds_per_image=seconds / max(1, len(samples)))
    return Evaluation(report, results)


def score(dataset: EvalDataset, results: Sequence[Mapping[str, Any]] | None, matrix: ConfusionMatrix | None,
          concepts: Sequence[str], *, class_agnostic: bool = False,
          subsets: Mapping[str, Sequence[str]] | None = None, image_ids: Sequence[Any] | None = None,
          semantic_class_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """The JSON report for COCO ``results`` and/or a semantic ``matrix`` (either may be None) over ``concepts``.

    ``semantic_class_ids`` restricts the overall mIoU (default: every class); subset mIoUs exclude background.
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


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
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


def _parse_subset(text: str) -> tuple[str, list[str]]:
    name, sep, members = text.partition("=")
    if not sep or not name or not members:
        raise argparse.ArgumentTypeError(f"--subset takes NAME=concept,concept,...; got {text!r}")
    return name, [m.strip() for m in members.split(",") if m.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__.split("\n\n")[0])
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
    args = build_parser().parse_args(argv)
    subsets = dict(args.subset)
    if args.results is not None:
        if args.coco is None:
            raise SystemExit("--results needs --coco")
        if not args.results.is_file():
            raise FileNotFoundError(f"results file not found: {args.results}")
        with args.results.open() as f:
            results = json.load(f)
        coco = load_coco_json(args.coco)
        cats = sorted(coco["categories"], key=lambda c: c["id"])
        dataset = EvalDataset((), tuple(c["name"] for c in cats), tuple(c["id"] for c in cats), coco)
        report = score(dataset, results, None, args.concepts or list(dataset.class_names),
                       class_agnostic=args.class_agnostic, subsets=subsets,
                       image_ids=[img["id"] for img in coco["images"]])
    else:
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
                                         geometry=args.geometry, input_size=args.input_size,
                                         class_agnostic=args.class_agnostic, subsets=subsets,
                                         batch_size=args.batch_size, max_images=args.max_images, progress=True,
                                         exif_orientation=args.exif_orientation)
        report = evaluation.report
        if args.save_results is not None:
            args.save_results.write_text(json.dumps(evaluation.results))
    print(format_report(report))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2))
        print(f"report written to {args.out}")
    return 0
