"""The shapes world: concepts and split, the renderer's ground truth, captions, and the files written to disk
(``model.shapes.dataset``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from model.training.shapes.dataset import write_eval_scenes, write_index
from model.training.shapes.world import (COLOUR_JITTER, COLOURS, PIXEL_NOISE, SHAPES, ShapesWorld, caption,
                                render_caption_batch, render_scene, sample_caption, visible_masks)

WORLD = ShapesWorld()


# -- concepts and split ------------------------------------------------------------------------------------------

def test_world_concepts_are_64_colour_shape_pairs_with_ids_1_to_64() -> None:
    assert len(WORLD.concepts) == 64 == len(set(WORLD.concepts))
    assert WORLD.concept_name(1) == "red circle" and WORLD.concept_name(64) == "black diamond"
    for cid in range(1, 65):
        name = WORLD.concept_name(cid)
        assert WORLD.concept_id(name) == cid
        assert name == f"{list(COLOURS)[WORLD.colour_index(cid)]} {SHAPES[WORLD.shape_index(cid)]}"
    assert WORLD.concept_id("  Blue   STAR ") == WORLD.concept_id("blue star")


@pytest.mark.parametrize("bad", [0, 65, -1])
def test_world_concept_name_rejects_out_of_range_ids(bad: int) -> None:
    with pytest.raises(ValueError, match="1..64"):
        WORLD.concept_name(bad)


def test_world_concept_id_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown concept"):
        WORLD.concept_id("pink circle")


def test_world_split_is_48_16_and_covers_every_colour_and_shape_on_both_sides() -> None:
    seen, unseen = WORLD.seen_ids, WORLD.unseen_ids
    assert len(seen) == 48 and len(unseen) == 16 and not set(seen) & set(unseen)
    assert set(seen) | set(unseen) == set(range(1, 65))
    for ids in (seen, unseen):
        colours = [WORLD.colour_index(i) for i in ids]
        shapes = [WORLD.shape_index(i) for i in ids]
        assert sorted(set(colours)) == list(range(8)) and sorted(set(shapes)) == list(range(8))
    # balanced: every colour and every shape is unseen exactly twice
    assert np.bincount([WORLD.colour_index(i) for i in unseen]).tolist() == [2] * 8
    assert np.bincount([WORLD.shape_index(i) for i in unseen]).tolist() == [2] * 8
    with pytest.raises(ValueError, match="unknown split"):
        WORLD.split_ids("train")


# -- rendering ---------------------------------------------------------------------------------------------------

def test_render_scene_is_deterministic_by_seed() -> None:
    a = render_scene(np.random.default_rng(7), 96, 5)
    b = render_scene(np.random.default_rng(7), 96, 5)
    c = render_scene(np.random.default_rng(8), 96, 5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("seed", range(6))
def test_render_scene_masks_agree_with_pixels_and_occlusion_order(seed: int) -> None:
    scene = render_scene(np.random.default_rng(seed), 128, 8, max_occlusion=0.6)
    n = len(scene.concept_ids)
    assert n >= 2, "eight objects at 128 px should leave at least two on the canvas"
    assert scene.image.shape == (128, 128, 3) and scene.image.dtype == np.uint8
    assert scene.masks.shape == scene.amodal_masks.shape == (n, 128, 128) and scene.masks.dtype == bool
    # visible = full shape minus everything drawn later (later objects occlude earlier ones), computed here
    # independently of visible_masks()
    for i in range(n):
        later = scene.amodal_masks[i + 1:].any(axis=0) if i + 1 < n else np.zeros((128, 128), bool)
        np.testing.assert_array_equal(scene.masks[i], scene.amodal_masks[i] & ~later)
    assert scene.masks.sum(axis=0).max() <= 1, "visible masks must not overlap"
    for i, cid in enumerate(scene.concept_ids):
        palette = np.array(COLOURS[WORLD.concept_name(int(cid)).split()[0]])
        assert np.abs(scene.colours[i].astype(int) - palette).max() <= COLOUR_JITTER
        pixels = scene.image[scene.masks[i]].astype(int)
        assert len(pixels) >= 16
        assert np.abs(pixels - scene.colours[i].astype(int)).max() <= PIXEL_NOISE
        # at most max_occlusion of each object's own area is hidden
        assert scene.masks[i].sum() >= 0.4 * scene.amodal_masks[i].sum() - 1


def test_render_scene_draws_the_requested_concepts_back_to_front() -> None:
    scene = render_scene(np.random.default_rng(3), 128, ["red circle", 10, "black star"], max_occlusion=1.0)
    assert scene.concept_ids.tolist() == [1, 10, WORLD.concept_id("black star")]


def test_render_scene_shapes_are_not_a_colour_threshold() -> None:
    # the background takes any colour, so some backgrounds contain the object's palette colour
    hits = 0
    for seed in range(40):
        scene = render_scene(np.random.default_rng(seed), 64, ["red square"])
        background = scene.image[~scene.masks[0]].astype(int)
        hits += bool((np.abs(background - np.array(COLOURS["red"])).max(axis=1) <= 40).any())
    assert hits >= 4


def test_render_scene_rejects_bad_input() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown concept"):
        render_scene(rng, 64, ["pink circle"])
    with pytest.raises(ValueError, match="1..64"):
        render_scene(rng, 64, [0])
    with pytest.raises(ValueError, match="at least 8"):
        render_scene(rng, 4, 1)


def test_visible_masks_handles_no_objects() -> None:
    assert visible_masks(np.zeros((0, 5, 5), bool)).shape == (0, 5, 5)
    scene = render_scene(np.random.default_rng(0), 64, 0)
    assert scene.masks.shape == (0, 64, 64) and scene.concept_ids.shape == (0,)


# -- captions ----------------------------------------------------------------------------------------------------

def test_caption_lists_objects_with_articles() -> None:
    assert caption(["red circle"]) == "a red circle"
    assert caption(["orange star", "blue ring"]) == "an orange star and a blue ring"
    assert caption(["red circle", "blue star", "green heart"], "a photo of {}") == \
        "a photo of a red circle, a blue star and a green heart"
    assert caption(["red circle", "blue star"], articles=False) == "red circle and blue star"
    assert caption([]) == "background"


def test_longest_caption_fits_the_text_context_untruncated() -> None:
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer(context_length=16)
    longest = caption(["yellow triangle", "purple diamond", "orange triangle"], "a photo of {}")
    assert len(tokenizer.encode(longest)) + 2 <= 16


def test_render_caption_batch_captions_name_what_is_visible() -> None:
    rng = np.random.default_rng(0)
    images, captions, contents = render_caption_batch(rng, 64, 64, objects_p=(0.5, 0.3, 0.2), empty_p=0.1)
    assert images.shape == (64, 64, 64, 3) and len(captions) == len(contents) == 64
    assert any(c == () for c in contents) and any(len(c) == 3 for c in contents)
    for text, content in zip(captions, contents):
        named = [cid for cid in range(1, 65) if WORLD.concept_name(cid) in text]
        assert sorted(named) == list(content), text
    again = render_caption_batch(np.random.default_rng(0), 64, 64, objects_p=(0.5, 0.3, 0.2), empty_p=0.1)
    np.testing.assert_array_equal(images, again[0])
    assert captions == again[1]


def test_sample_caption_uses_bare_names_sometimes() -> None:
    rng = np.random.default_rng(0)
    texts = {sample_caption(rng, ["red circle"]) for _ in range(200)}
    assert {"red circle", "a red circle", "a photo of a red circle", "an image of a red circle"} <= texts


def test_render_caption_batch_rejects_bad_probabilities() -> None:
    with pytest.raises(ValueError, match="summing to 1"):
        render_caption_batch(np.random.default_rng(0), 2, 64, objects_p=(0.5, 0.2))


# -- files on disk (model.shapes.dataset) ------------------------------------------------------------------------

def test_write_eval_scenes_coco_rles_decode_to_the_label_pngs(tmp_path) -> None:
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    path = write_eval_scenes(tmp_path / "eval", 6, seed=1, size=96, progress=False)
    coco = COCO(str(path))
    assert sorted(coco.getCatIds()) == list(range(1, 65))
    assert all(coco.loadCats(cid)[0]["name"] == WORLD.concept_name(cid) for cid in range(1, 65))
    assert {c["split"] for c in coco.loadCats(list(WORLD.unseen_ids))} == {"unseen"}
    assert len(coco.getImgIds()) == 6
    n_objects = []
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        labels = np.asarray(Image.open(tmp_path / "eval" / "labels" / info["file_name"]))
        image = np.asarray(Image.open(tmp_path / "eval" / "images" / info["file_name"]))
        assert labels.shape == (96, 96) and labels.dtype == np.uint8 and image.shape == (96, 96, 3)
        rebuilt = np.zeros_like(labels)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        n_objects.append(len(anns))
        for ann in anns:
            assert ann["iscrowd"] == 0
            mask = coco.annToMask(ann).astype(bool)
            assert ann["area"] == mask.sum() > 0
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert not (rebuilt[mask] != 0).any(), "instance masks overlap"
            rebuilt[mask] = ann["category_id"]
            assert mask_utils.area(ann["segmentation"]) == ann["area"]
        np.testing.assert_array_equal(rebuilt, labels)
    assert min(n_objects) >= 1 and max(n_objects) >= 3


def test_write_eval_scenes_is_deterministic_and_independent_of_count(tmp_path) -> None:
    write_eval_scenes(tmp_path / "a", 3, seed=5, size=64, progress=False)
    write_eval_scenes(tmp_path / "b", 2, seed=5, size=64, progress=False)
    for name in ("000000.png", "000001.png"):
        for sub in ("images", "labels"):
            np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a" / sub / name)),
                                          np.asarray(Image.open(tmp_path / "b" / sub / name)))


def test_write_index_keeps_truth_out_of_the_image_folder(tmp_path) -> None:
    from pycocotools.coco import COCO

    path = write_index(tmp_path / "index", 40, seed=0, size=64, progress=False)
    assert path == tmp_path / "index" / "truth" / "instances.json"
    files = sorted(p.name for p in (tmp_path / "index" / "images").iterdir())
    assert files == [f"{k:06d}.png" for k in range(40)]
    coco = COCO(str(path))
    kinds = {img["kind"] for img in coco.loadImgs(coco.getImgIds())}
    assert kinds == {"single", "empty", "multi"}
    for img in coco.loadImgs(coco.getImgIds()):
        n = len(coco.getAnnIds(imgIds=img["id"]))
        assert (n == 0) if img["kind"] == "empty" else (n == 1) if img["kind"] == "single" else (n >= 2)
    assert json.loads(path.read_text())["info"]["seed"] == 0


def test_write_index_rejects_bad_fractions(tmp_path) -> None:
    with pytest.raises(ValueError, match="single_p"):
        write_index(tmp_path, 1, seed=0, single_p=0.9, empty_p=0.2, progress=False)
