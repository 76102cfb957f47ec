"""COCO mask AP: pycocotools ``COCOeval`` (``iouType="segm"``, maxDets [1, 10, 100]) of a results list against a
COCO instances dataset, with the checks that turn a malformed dataset or result into a readable ``ValueError``.

Owns reading a COCO dataset (``load_coco_json``), completing its annotations and validating results the way
``COCOeval`` needs them, the class-agnostic variant (every category mapped to one) and the per-category AP.
Everything in the report is a percentage (``model.training.evaluation.percent``), None where undefined.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from model.training.evaluation.percent import percent

logger = logging.getLogger(__name__)

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
"""The names of ``COCOeval.stats`` in order, as the report's keys."""

AGNOSTIC_CATEGORY = {"id": 1, "name": "object"}
"""The one category of a class-agnostic evaluation."""


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
    dataset = load_coco_json(gt)
    images = {img["id"]: img for img in dataset["images"]}
    names = {cat["id"]: cat.get("name", str(cat["id"])) for cat in dataset["categories"]}
    category_ids = _requested_categories(category_ids, names)
    image_ids = _requested_images(image_ids, images)
    gt_anns = _complete_gt_annotations(dataset["annotations"], images)
    dt_anns = [_check_result(res, k, images, names) for k, res in enumerate(results)]
    categories, eval_cat_ids = dataset["categories"], list(category_ids)
    if class_agnostic:
        gt_anns = _as_one_category(gt_anns, category_ids)
        dt_anns = _as_one_category(dt_anns, category_ids)
        categories, eval_cat_ids = [dict(AGNOSTIC_CATEGORY)], [AGNOSTIC_CATEGORY["id"]]
        names = {AGNOSTIC_CATEGORY["id"]: AGNOSTIC_CATEGORY["name"]}
    evaluator = _run_cocoeval(dataset["images"], gt_anns, dt_anns, categories, eval_cat_ids, image_ids)

    report: dict[str, Any] = {name: percent(v) for name, v in zip(STAT_NAMES, evaluator.stats)}
    image_set = set(image_ids)
    gt_counts = Counter(a["category_id"] for a in gt_anns if a["image_id"] in image_set and not a["iscrowd"])
    per_category = _per_category(evaluator, eval_cat_ids, names, gt_counts)
    report.update(per_category=per_category, num_images=len(image_ids), class_agnostic=class_agnostic,
                  category_ids=list(category_ids),
                  num_gt=sum(c["num_gt"] for c in per_category.values()),
                  num_results=sum(1 for a in dt_anns if a["image_id"] in image_set
                                  and a["category_id"] in eval_cat_ids))
    return report


def _requested_categories(category_ids: Sequence[int] | None, names: Mapping[int, str]) -> list[int]:
    """The categories to evaluate: all of the ground truth's, sorted by id, or the requested ones (each a GT one)."""
    if category_ids is None:
        return sorted(names)
    category_ids = [int(c) for c in category_ids]
    unknown = sorted(set(category_ids) - set(names))
    if unknown:
        raise ValueError(f"category_ids {unknown} are not categories of the ground truth")
    return category_ids


def _requested_images(image_ids: Sequence[Any] | None, images: Mapping[Any, Any]) -> list[Any]:
    """The images to evaluate: all of the ground truth's, sorted by id, or the requested ones (each a GT one)."""
    if image_ids is None:
        return sorted(images)
    unknown = [i for i in image_ids if i not in images]
    if unknown:
        raise ValueError(f"image_ids {unknown[:5]} are not images of the ground truth")
    return list(image_ids)


def _complete_gt_annotations(annotations: Sequence[Mapping[str, Any]],
                             images: Mapping[Any, Any]) -> list[dict[str, Any]]:
    """Every GT annotation completed by ``_complete_gt_annotation``; their ids must be unique."""
    completed = [_complete_gt_annotation(ann, k, images) for k, ann in enumerate(annotations)]
    if len({a["id"] for a in completed}) != len(completed):
        raise ValueError("GT annotation ids are not unique")
    return completed


def _complete_gt_annotation(ann: Mapping[str, Any], k: int, images: Mapping[Any, Any]) -> dict[str, Any]:
    """Fill ``id``, ``iscrowd`` and ``area`` (which COCOeval needs) into a GT annotation."""
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


def _as_one_category(annotations: Sequence[dict[str, Any]], keep: Sequence[int]) -> list[dict[str, Any]]:
    """The annotations (GT or results) of the categories ``keep``, each moved to ``AGNOSTIC_CATEGORY``."""
    keep = set(keep)
    return [dict(a, category_id=AGNOSTIC_CATEGORY["id"]) for a in annotations if a["category_id"] in keep]


def _run_cocoeval(images: list[dict[str, Any]], gt_anns: list[dict[str, Any]], dt_anns: list[dict[str, Any]],
                  categories: list[dict[str, Any]], cat_ids: list[int], image_ids: list[Any]) -> COCOeval:
    """``COCOeval`` (segm, maxDets [1, 10, 100]) over ``cat_ids`` x ``image_ids``, evaluated, accumulated and
    summarised (``stats`` and ``eval["precision"]`` filled), its progress prints sent to the debug log."""
    coco_gt = _build_coco({"images": images, "annotations": gt_anns, "categories": categories})
    # Built by hand rather than with COCO.loadRes, which crashes on an empty result list.
    coco_dt = _build_coco({"images": images, "annotations": dt_anns, "categories": categories})
    with _quiet_pycocotools():
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.params.catIds = cat_ids
        evaluator.params.imgIds = image_ids
        evaluator.params.maxDets = [1, 10, 100]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _per_category(evaluator: COCOeval, cat_ids: Sequence[int], names: Mapping[int, str],
                  gt_counts: Counter[int]) -> dict[int, dict[str, Any]]:
    """``{category id: {"name", "AP", "AP50", "num_gt"}}`` from an accumulated evaluator: AP over all IoU
    thresholds and AP50, area "all" and maxDets 100; None where the category has no GT."""
    # precision: [T iou thresholds, R recall thresholds, K categories, A area ranges, M maxDets]
    precision: np.ndarray = evaluator.eval["precision"]
    per_category = {}
    for k, cat_id in enumerate(cat_ids):
        p_all, p_50 = precision[:, :, k, 0, -1], precision[0, :, k, 0, -1]
        per_category[cat_id] = {
            "name": names[cat_id],
            "AP": percent(p_all[p_all > -1].mean()) if (p_all > -1).any() else None,
            "AP50": percent(p_50[p_50 > -1].mean()) if (p_50 > -1).any() else None,
            "num_gt": gt_counts[cat_id],
        }
    return per_category


def _build_coco(dataset: dict[str, Any]) -> COCO:
    """A pycocotools ``COCO`` indexed over ``dataset`` as given (no file, no copy)."""
    coco = COCO()
    coco.dataset = dataset
    with _quiet_pycocotools():
        coco.createIndex()
    return coco


@contextlib.contextmanager
def _quiet_pycocotools() -> Iterator[None]:
    """Send pycocotools' progress prints to the debug log instead of stdout."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    if buffer.getvalue().strip():
        logger.debug("pycocotools: %s", buffer.getvalue().strip())


__all__ = ["STAT_NAMES", "AGNOSTIC_CATEGORY", "load_coco_json", "evaluate_instances"]
