"""What the objects of a copy-paste source image are, and where that comes from.

``Instance`` is one object of a source image: a COCO RLE and its concept id (or None: "the concept the image was
retrieved for"). The two sources of instances are the label-free pseudo-masks (``annotations_from_pseudo_masks``:
one salient object per image, labelled by retrieval) and COCO ground truth (``annotations_from_coco``: the
"oracle"). ``rasterise_instances`` turns an image's instances into the instance map that
``model.training.augment`` and ``model.training.copy_paste`` work on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from model.rle import decode_rle


@dataclass(frozen=True)
class Instance:
    """One object of a source image: a COCO RLE (``size`` = the image's [H, W]) and its concept id.

    ``label_id`` None means "the concept the image was retrieved for" (pseudo-masks); ground-truth annotations
    carry their own id (1-based into the training concepts).
    """

    rle: Mapping[str, Any]
    label_id: int | None = None


def annotations_from_pseudo_masks(pseudo_masks: Mapping[str, Mapping[str, Any]]) -> dict[str, list[Instance]]:
    """``{path: rle}`` (one salient object per image) -> ``{path: [Instance(rle)]}`` labelled by retrieval."""
    return {str(path): [Instance(rle)] for path, rle in pseudo_masks.items()}


def annotations_from_coco(annotation_file: str | Path, image_dir: str | Path,
                          concepts: Sequence[str]) -> dict[str, list[Instance]]:
    """Ground-truth instances from a COCO instances JSON (the "oracle" masks), keyed by ``image_dir/file_name``.

    Category names are matched to ``concepts`` exactly; instances of other categories are left out (their pixels
    count as background). Polygon segmentations are converted to RLE.
    """
    annotation_file = Path(annotation_file)
    if not annotation_file.is_file():
        raise FileNotFoundError(f"ground-truth annotation file not found: {annotation_file}")
    coco = json.loads(annotation_file.read_text())
    label_of_name = {c: i + 1 for i, c in enumerate(concepts)}
    label_of_cat = {c["id"]: label_of_name.get(c["name"]) for c in coco["categories"]}
    images = {im["id"]: im for im in coco["images"]}
    out: dict[str, list[Instance]] = {str(Path(image_dir) / im["file_name"]): [] for im in images.values()}
    for ann in coco["annotations"]:
        label = label_of_cat.get(ann["category_id"])
        if label is None:
            continue
        im = images[ann["image_id"]]
        seg = ann["segmentation"]
        h, w = im["height"], im["width"]
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg["counts"], list):
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = seg
        counts = rle["counts"]
        out[str(Path(image_dir) / im["file_name"])].append(
            Instance({"size": [h, w], "counts": counts.decode() if isinstance(counts, bytes) else counts}, label))
    return out


def rasterise_instances(instances: Sequence[Instance], size_hw: tuple[int, int], default_label: int,
                        path: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Instances -> (instance map (H,W) int64 with 0 background and ids 1..k, later ones on top; labels (k,))."""
    instance_map = np.zeros(size_hw, dtype=np.int64)
    labels = []
    for inst in instances:
        mask = decode_rle(dict(inst.rle))
        if mask.shape != tuple(size_hw):
            raise ValueError(f"{path}: mask size {mask.shape} does not match the image size {tuple(size_hw)}")
        labels.append(default_label if inst.label_id is None else inst.label_id)
        instance_map[mask] = len(labels)
    return instance_map, np.asarray(labels, dtype=np.int64)


__all__ = ["Instance", "annotations_from_pseudo_masks", "annotations_from_coco", "rasterise_instances"]
