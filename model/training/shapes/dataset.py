"""Writing shapes-world data to disk: an unlabelled image index and evaluation scenes with COCO ground truth.

Layouts (all images 128 x 128 RGB PNG by default, file names ``{k:06d}.png``):

``write_index(out_dir, n, seed)``::

    out_dir/images/000000.png ...     the unlabelled index (what retrieval sees: images only)
    out_dir/truth/instances.json      hidden ground truth, COCO instances (never read by the method itself)

  Like a real web-scale index it is impure: ``single_p`` of the images hold one object, ``empty_p`` are clutter
  only (background texture, lines, dots) and the rest hold 2-3 objects. Each image record in the JSON also
  carries ``"kind"``: ``"empty"``, ``"single"`` or ``"multi"`` (from the objects actually drawn: a rare
  multi-object draw whose later objects found no room counts as single).

``write_eval_scenes(out_dir, n, seed)``::

    out_dir/images/000000.png ...     held-out scenes with 1-8 objects
    out_dir/labels/000000.png ...     uint8 label maps: concept id 1..64 per pixel, 0 background
    out_dir/instances.json            COCO instances ground truth

COCO JSON: ``categories`` are ids 1..64 with ``name`` the concept ("red circle"), ``supercategory`` the shape,
plus ``colour``, ``shape`` and ``split`` ("seen"/"unseen"); annotations hold visible (after occlusion) masks as
RLE with ``counts`` a str, ``area`` in pixels, ``bbox`` ``[x, y, w, h]`` in pixels, ``iscrowd`` 0.

Image ``k`` is rendered from ``numpy.random.default_rng([seed, stream, k])`` (stream 1 for the index, 2 for
evaluation scenes), so any image can be regenerated alone and files never depend on ``n``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from model.training.shapes.world import COLOURS, SHAPES, Scene, ShapesWorld, render_scene

INDEX_STREAM = 1
EVAL_STREAM = 2


def coco_categories(world: ShapesWorld) -> list[dict[str, Any]]:
    """COCO ``categories`` for the 64 concepts (ids 1..64)."""
    unseen = set(world.unseen_ids)
    return [{"id": cid, "name": world.concept_name(cid), "supercategory": SHAPES[world.shape_index(cid)],
             "colour": list(COLOURS)[world.colour_index(cid)], "shape": SHAPES[world.shape_index(cid)],
             "split": "unseen" if cid in unseen else "seen"} for cid in world.split_ids("all")]


def coco_annotations(scene: Scene, image_id: int, first_id: int) -> list[dict[str, Any]]:
    """COCO annotation records of a scene's visible masks, ids ``first_id, first_id + 1, ...``."""
    records = []
    for k, (mask, cid) in enumerate(zip(scene.masks, scene.concept_ids)):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        records.append({
            "id": first_id + k, "image_id": image_id, "category_id": int(cid),
            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": int(mask.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
        })
    return records


def label_map(scene: Scene) -> np.ndarray:
    """(H, W) uint8: the concept id of the visible object at each pixel, 0 for background."""
    labels = np.zeros(scene.image.shape[:2], dtype=np.uint8)
    for mask, cid in zip(scene.masks, scene.concept_ids):
        labels[mask] = cid
    return labels


def write_index(out_dir: str | Path, n_images: int, seed: int, *, size: int = 128, single_p: float = 0.8,
                empty_p: float = 0.1, world: ShapesWorld | None = None, progress: bool = True) -> Path:
    """Write an unlabelled index of ``n_images`` PNGs and its hidden COCO ground truth; returns the JSON path.

    Single-object images draw their concept uniformly from all 64; multi-object images hold 2 or 3 objects.
    """
    world = world or ShapesWorld()
    _check_counts(n_images, size)
    if not (0 <= single_p and 0 <= empty_p and single_p + empty_p <= 1):
        raise ValueError(f"need 0 <= single_p, empty_p and single_p + empty_p <= 1, got {single_p}, {empty_p}")
    out_dir = Path(out_dir)
    image_dir, truth_dir = out_dir / "images", out_dir / "truth"
    image_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for k in _progress(range(n_images), progress, "index"):
        rng = np.random.default_rng([seed, INDEX_STREAM, k])
        u = rng.random()
        n = 1 if u < single_p else 0 if u < single_p + empty_p else int(rng.integers(2, 4))
        scene = render_scene(rng, size, n, world)
        kind = ("empty", "single")[len(scene.concept_ids)] if len(scene.concept_ids) < 2 else "multi"
        name = f"{k:06d}.png"
        Image.fromarray(scene.image).save(image_dir / name)
        images.append({"id": k + 1, "file_name": name, "height": size, "width": size, "kind": kind})
        annotations += coco_annotations(scene, k + 1, len(annotations) + 1)
    info = {"description": "shapes-world unlabelled index (hidden ground truth)", "seed": seed,
            "single_p": single_p, "empty_p": empty_p, "image_dir": "../images"}
    return _write_json(truth_dir / "instances.json", info, images, annotations, world)


def write_eval_scenes(out_dir: str | Path, n_images: int, seed: int, *, size: int = 128,
                      objects: tuple[int, int] = (1, 8), world: ShapesWorld | None = None,
                      progress: bool = True) -> Path:
    """Write ``n_images`` evaluation scenes (uniformly ``objects[0]..objects[1]`` objects each, all 64 concepts),
    their label PNGs and COCO instances JSON; returns the JSON path. Objects that cannot be placed without hiding
    too much of an earlier one are dropped, so a scene may hold fewer objects than drawn.
    """
    world = world or ShapesWorld()
    _check_counts(n_images, size)
    if not 0 <= objects[0] <= objects[1]:
        raise ValueError(f"objects must be a (min, max) range with 0 <= min <= max, got {objects}")
    out_dir = Path(out_dir)
    image_dir, label_dir = out_dir / "images", out_dir / "labels"
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for k in _progress(range(n_images), progress, "eval scenes"):
        rng = np.random.default_rng([seed, EVAL_STREAM, k])
        scene = render_scene(rng, size, int(rng.integers(objects[0], objects[1] + 1)), world)
        name = f"{k:06d}.png"
        Image.fromarray(scene.image).save(image_dir / name)
        Image.fromarray(label_map(scene)).save(label_dir / name)
        images.append({"id": k + 1, "file_name": name, "height": size, "width": size})
        annotations += coco_annotations(scene, k + 1, len(annotations) + 1)
    info = {"description": "shapes-world evaluation scenes", "seed": seed, "objects": list(objects),
            "image_dir": "images", "label_dir": "labels"}
    return _write_json(out_dir / "instances.json", info, images, annotations, world)


def _check_counts(n_images: int, size: int) -> None:
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    if size < 32:
        raise ValueError(f"image size must be at least 32 px, got {size}")


def _write_json(path: Path, info: dict[str, Any], images: list, annotations: list, world: ShapesWorld) -> Path:
    coco = {"info": info, "images": images, "annotations": annotations, "categories": coco_categories(world)}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(coco))
    tmp.replace(path)
    return path


def _progress(it: range, enabled: bool, desc: str):
    if not enabled:
        return it
    return tqdm(it, desc=desc, unit="img", mininterval=2.0)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write shapes-world data to disk.")
    parser.add_argument("what", choices=["index", "eval"], help="an unlabelled index or evaluation scenes")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    args = parser.parse_args(argv)
    write = write_index if args.what == "index" else write_eval_scenes
    print(write(args.out, args.n, args.seed, size=args.size))


if __name__ == "__main__":
    main()
