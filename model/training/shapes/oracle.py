"""Rendered scenes with their true masks and labels as ZUTIS training data: the "oracle" rungs of the ladder.

The method itself never sees ground truth. The ladder's R0 ("the head and the training loop alone") does: it trains
ZUTIS on freshly rendered 1-8-object scenes (a seed of their own, disjoint from the validation and test scenes) with
every object's true mask and a label the encoder can see, so that whatever stays weak is the head, the matcher, the
loss, the schedule or the post-processing, not the CLIP or the pseudo-labels.

Labellings (``LABELLINGS``): ``"colour"`` labels each object with its colour (8 concepts, "red", "orange", ...);
``"concept"`` with its colour-shape concept (the 64 "red circle" names). Evaluation scenes are relabelled the same
way (``write_relabelled_scenes``), so category AP and mIoU are measured on the vocabulary the model was trained on.

Layout written by ``write_training_scenes(out_dir, ...)``::

    out_dir/scenes/images/000000.png ...  the rendered scenes (model.shapes.dataset.write_eval_scenes)
    out_dir/instances.json                 their COCO instances under the labelling
    out_dir/labels/000000.png ...          label maps under the labelling
    out_dir/images -> scenes/images        (symlink) so out_dir is a scene folder like the test scenes
    out_dir/retrieval.json                 {concept: [file names of the scenes that hold it]} (``retrieval_lists``)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from model.training.shapes.dataset import write_eval_scenes
from model.training.shapes.world import COLOURS, SHAPES, ShapesWorld

LABELLINGS = ("colour", "concept")


def labelling_vocabulary(labels: str) -> list[str]:
    """The concept names of a labelling, in label-id order (id k = name k-1; background not included)."""
    if labels == "colour":
        return list(COLOURS)
    if labels == "concept":
        return ShapesWorld().split_names("all")
    raise ValueError(f"labels must be one of {list(LABELLINGS)}, got {labels!r}")


def concept_to_label(labels: str) -> np.ndarray:
    """(65,) int64 lookup: world concept id (0 background, 1..64) -> label id under ``labels`` (0 background)."""
    world = ShapesWorld()
    lut = np.zeros(len(COLOURS) * len(SHAPES) + 1, dtype=np.int64)
    for cid in world.split_ids("all"):
        lut[cid] = world.colour_index(cid) + 1 if labels == "colour" else cid
    if labels not in LABELLINGS:
        raise ValueError(f"labels must be one of {list(LABELLINGS)}, got {labels!r}")
    return lut


def relabel_coco(coco: dict[str, Any], labels: str) -> dict[str, Any]:
    """A shapes-world COCO instances dict (categories = the 64 concepts) with its categories and annotations mapped
    to ``labels``. Categories keep the ``colour`` / ``shape`` fields ``experiments/shapes/shapes_diagnostics.py`` reads
    (a colour category's shape is ``"any"``)."""
    lut = concept_to_label(labels)
    names = labelling_vocabulary(labels)
    if labels == "colour":
        categories = [{"id": k + 1, "name": c, "supercategory": "colour", "colour": c, "shape": "any"}
                      for k, c in enumerate(names)]
    else:
        categories = [dict(c) for c in coco["categories"]]
    annotations = [{**a, "category_id": int(lut[a["category_id"]])} for a in coco["annotations"]]
    info = {**coco.get("info", {}), "labels": labels}
    return {**coco, "info": info, "categories": categories, "annotations": annotations}


def write_relabelled_scenes(scene_dir: str | Path, out_dir: str | Path, labels: str) -> Path:
    """Relabel a scene folder (``images/``, ``labels/``, ``instances.json``) into ``out_dir``: a relabelled
    ``instances.json`` and label maps, and ``images`` as a symlink to the original images. Returns ``out_dir``."""
    scene_dir, out_dir = Path(scene_dir).resolve(), Path(out_dir)
    lut = concept_to_label(labels).astype(np.uint8)
    coco = json.loads((scene_dir / "instances.json").read_text())
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    for im in coco["images"]:
        name = Path(im["file_name"]).stem + ".png"
        label = np.asarray(Image.open(scene_dir / "labels" / name))
        Image.fromarray(lut[label]).save(out_dir / "labels" / name)
    link = out_dir / "images"
    if not link.exists():  # relative: stages are built in a temporary folder and then renamed
        os.symlink(os.path.relpath(scene_dir / "images", out_dir.resolve()), link, target_is_directory=True)
    (out_dir / "instances.json").write_text(json.dumps(relabel_coco(coco, labels)))
    return out_dir


def write_training_scenes(out_dir: str | Path, n_scenes: int, seed: int, labels: str, *, size: int = 128,
                          objects: tuple[int, int] = (1, 8), progress: bool = True) -> Path:
    """Render ``n_scenes`` training scenes (``write_eval_scenes`` with ``seed``), relabel them and write the
    ``retrieval.json`` that ``model.train`` reads as a finished retrieval (see the module doc). Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    write_eval_scenes(out_dir / "scenes", n_scenes, seed, size=size, objects=tuple(objects), progress=progress)
    write_relabelled_scenes(out_dir / "scenes", out_dir, labels)
    coco = json.loads((out_dir / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    held: dict[str, set[int]] = {name: set() for name in labelling_vocabulary(labels)}
    for ann in coco["annotations"]:
        held[names[ann["category_id"]]].add(ann["image_id"])
    # file names only: the stage folder is renamed once built (retrieval_lists makes them absolute)
    (out_dir / "retrieval.json").write_text(json.dumps({n: [files[i] for i in sorted(ids)] for n, ids in held.items()}))
    return out_dir


def retrieval_lists(train_dir: str | Path) -> dict[str, list[str]]:
    """``{concept: [absolute image paths]}`` of a ``write_training_scenes`` folder: every scene that holds an object
    of the concept (what ``model.train`` reads as a finished retrieval)."""
    images = Path(os.path.abspath(Path(train_dir) / "images"))
    names = json.loads((Path(train_dir) / "retrieval.json").read_text())
    return {concept: [str(images / name) for name in files] for concept, files in names.items()}


__all__ = ["LABELLINGS", "labelling_vocabulary", "concept_to_label", "relabel_coco", "write_relabelled_scenes",
           "write_training_scenes", "retrieval_lists"]
