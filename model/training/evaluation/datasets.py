"""Evaluation datasets on disk and reading their files: images, label PNGs and COCO annotations.

Two layouts: a COCO instances JSON + image folder (optionally with a folder of label PNGs for semantic GT), or an
image folder + a label-PNG folder (PNG value = class index, 0 = background, 255 = ignore). Either becomes an
``EvalDataset`` whose class k (1-based) is the k-th class name.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from model.orientation import apply_exif_orientation
from model.training.evaluation.coco_ap import load_coco_json
from model.training.files import IMAGE_SUFFIXES, is_image_file


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
    """An image folder + label-PNG folder (same stem; value k = ``class_names[k - 1]``, 0 background, 255 ignore).

    Images are the folder's image files (``model.training.files.is_image_file``) sorted by name; their ids are
    their stems.
    """
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


def _find_label(label_dir: Path, stems: Sequence[str]) -> Path:
    """The first ``{stem}.png`` of ``stems`` that exists in ``label_dir``."""
    for stem in stems:
        candidate = label_dir / f"{stem}.png"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no label map {' or '.join(f'{s}.png' for s in stems)} in {label_dir}")


def load_label_map(path: str | Path) -> np.ndarray:
    """A label PNG as an (H, W) int64 array of class indices (palette PNGs give their indices)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label map not found: {path}")
    with Image.open(path) as img:
        if img.mode not in ("P", "L", "I", "I;16", "1"):
            raise ValueError(f"{path}: label maps must be single-channel PNGs (mode P, L or I), got mode {img.mode}")
        return np.array(img).astype(np.int64)


def read_image(path: Path, exif_orientation: bool = True) -> Image.Image:
    """An image file as an RGB PIL image (``height`` x ``width`` as seen): the first picture of multi-picture
    files, upright by its EXIF orientation unless ``exif_orientation`` is False."""
    with Image.open(path) as img:
        img.load()
        upright = apply_exif_orientation(img) if exif_orientation else img
        return upright.convert("RGB")


__all__ = ["EvalSample", "EvalDataset", "load_coco_dataset", "load_label_folder_dataset", "load_label_map",
           "read_image"]
