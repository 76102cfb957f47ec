"""model.shapes.oracle: rendered training scenes with true masks, relabelled to the colour vocabulary (ladder R0)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.training.shapes.oracle import (labelling_vocabulary, relabel_coco, retrieval_lists, write_relabelled_scenes,
                                 write_training_scenes)
from model.training.shapes.world import COLOURS, ShapesWorld

LADDER = Path(__file__).resolve().parents[4] / "experiments" / "shapes" / "configs"


def test_colour_labelling_maps_every_concept_to_its_colour():
    world = ShapesWorld()
    coco = {"images": [], "categories": [{"id": c, "name": world.concept_name(c)} for c in world.split_ids("all")],
            "annotations": [{"id": 1, "image_id": 1, "category_id": world.concept_id("blue star")},
                            {"id": 2, "image_id": 1, "category_id": world.concept_id("blue heart")}]}
    out = relabel_coco(coco, "colour")
    names = {c["id"]: c["name"] for c in out["categories"]}
    assert [names[a["category_id"]] for a in out["annotations"]] == ["blue", "blue"]
    assert labelling_vocabulary("colour") == list(COLOURS)
    with pytest.raises(ValueError, match="labels"):
        labelling_vocabulary("shape")


def test_training_scenes_are_relabelled_consistently_and_listed_per_colour(tmp_path):
    out = write_training_scenes(tmp_path / "train", 6, seed=3, labels="colour", size=64, progress=False)
    coco = json.loads((out / "instances.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(COLOURS)
    for im in coco["images"]:  # the label map says the same colour as the instances
        label = np.asarray(Image.open(out / "labels" / im["file_name"]))
        for ann in (a for a in coco["annotations"] if a["image_id"] == im["id"]):
            from pycocotools import mask as mask_utils

            mask = mask_utils.decode(ann["segmentation"]).astype(bool)
            assert set(np.unique(label[mask])) == {ann["category_id"]}
    lists = retrieval_lists(out)
    assert all(p.startswith("/") and (out / "images" / p.split("/")[-1]).is_file() for ps in lists.values() for p in ps)
    held = {(a["image_id"], a["category_id"]) for a in coco["annotations"]}
    assert sum(len(ps) for ps in lists.values()) == len(held)
    # a relabelled copy reads its images through a relative link, so it survives the stage folder's rename
    built = write_relabelled_scenes(out / "scenes", tmp_path / "copy.tmp-1", "colour")
    final = built.rename(tmp_path / "copy")
    assert sorted(p.name for p in (final / "images").iterdir()) == [im["file_name"] for im in coco["images"]]


def test_oracle_scenes_may_not_use_the_evaluation_seeds():
    from model.training.config import TrainConfig

    from model.training.config_files import read_config

    base = read_config(LADDER / "r0_base.json")
    base["oracle_scenes"] = {**base["oracle_scenes"], "seed": base["world"]["test_seed"]}
    with pytest.raises(ValueError, match="seed"):
        TrainConfig.from_dict(base)
    base["oracle_scenes"]["seed"] = 3
    cfg = TrainConfig.from_dict(base)
    assert cfg.vocabulary == tuple(COLOURS) and cfg.export_vocabulary == tuple(COLOURS)
