"""Copy-paste synthesis: targets agree with the composed image, occlusion, padding, determinism, sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from model.training.annotations import Instance, annotations_from_coco
from model.training.augment import augment_geometry
from model.training.copy_paste import (AugmentedSource, CopyPasteDataset, StepBatchSampler, SynthesisParams,
                                       collate_samples, compose)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def _world(n_images: int = 6, seed: int = 0, size: int = 48):
    """In-memory images with one rectangular object each, two concepts."""
    rng = np.random.default_rng(seed)
    images, annotations = {}, {}
    for i in range(n_images):
        h, w = int(rng.integers(size, 2 * size)), int(rng.integers(size, 2 * size))
        images[f"im{i}"] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        m = np.zeros((h, w), bool)
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        m[y0:y0 + h // 3, x0:x0 + w // 3] = True
        annotations[f"im{i}"] = [Instance(_rle(m))]
    half = n_images // 2
    retrieval = {"cat": [f"im{i}" for i in range(half)], "dog": [f"im{i}" for i in range(half, n_images)]}
    return images, annotations, retrieval


def _dataset(params: SynthesisParams, seed: int = 0) -> CopyPasteDataset:
    images, annotations, retrieval = _world(size=params.crop_size)
    return CopyPasteDataset(retrieval, ["cat", "dog"], annotations, params, seed, load_image=images.__getitem__,
                            check_files=False)


def _source(pixels: torch.Tensor, instance_map: np.ndarray, labels: list[int]) -> AugmentedSource:
    return AugmentedSource(pixels, instance_map.astype(np.int64), np.asarray(labels, dtype=np.int64))


def test_compose_pasted_pixels_equal_source_pixels_under_mask():
    s = 16
    rng = np.random.default_rng(3)
    canvas_map = np.zeros((s, s), np.int64)
    canvas_map[2:6, 2:6] = 1
    canvas_map[:, -2:] = -1  # canvas padding
    obj_map = np.zeros((s, s), np.int64)
    obj_map[5:9, 7:12] = 1
    obj_map[8, 7] = 0  # a non-rectangular object: the hole must keep the canvas pixel
    a, b = torch.randn(3, s, s), torch.randn(3, s, s)
    params = SynthesisParams(crop_size=s)
    out = compose([_source(a, canvas_map, [2]), _source(b, obj_map, [1])], rng, params)

    pasted = out.instance_masks[1].numpy()
    ys, xs = np.nonzero(pasted)
    ty, tx = ys.min(), xs.min()  # the paste offset of the (inclusive) bbox, last row/column included
    assert pasted.sum() == (obj_map > 0).sum() and ys.max() - ty == 3 and xs.max() - tx == 4
    expected = torch.from_numpy(obj_map[5:9, 7:12] > 0)
    assert torch.equal(torch.from_numpy(pasted[ty:ty + 4, tx:tx + 5]), expected)
    sel = torch.from_numpy(pasted)
    shifted = torch.zeros_like(b)
    shifted[:, ty:ty + 4, tx:tx + 5] = b[:, 5:9, 7:12]
    assert torch.equal(out.image[:, sel], shifted[:, sel])
    assert torch.equal(out.image[:, ~sel], a[:, ~sel])  # everything else is the canvas, its background included
    # semantic target: pasted label under the paste, canvas labels elsewhere, ignore on canvas padding only
    sem = out.semantic.numpy()
    assert (sem[pasted] == 1).all()
    assert (sem[~pasted & (canvas_map == -1)] == params.ignore_index).all()
    assert (sem[~pasted & (canvas_map == 1)] == 2).all()
    assert (sem[~pasted & (canvas_map == 0)] == 0).all()
    assert out.instance_labels.tolist() == [2, 1]


def test_compose_later_objects_occlude_and_hidden_instances_stay_as_empty_masks():
    s = 12
    full = np.ones((s, s), np.int64)  # objects covering the whole crop can only be pasted at (0, 0)
    srcs = [_source(torch.full((3, s, s), float(i)), full, [i + 1]) for i in range(3)]
    srcs.append(_source(torch.full((3, s, s), 9.0), np.zeros((s, s), np.int64), [3]))  # no object pixels
    out = compose(srcs, np.random.default_rng(0), SynthesisParams(crop_size=s))
    assert out.instance_masks.shape == (4, s, s)
    assert [int(m.sum()) for m in out.instance_masks] == [0, 0, s * s, 0]
    assert torch.equal(out.image, torch.full((3, s, s), 2.0))
    assert (out.semantic == 3).all() and out.instance_labels.tolist() == [1, 2, 3, 3]


@pytest.mark.parametrize("copy_paste", [True, False])
def test_dataset_samples_are_self_consistent(copy_paste):
    params = SynthesisParams(crop_size=48, copy_paste=copy_paste)
    ds = _dataset(params)
    n_instances = set()
    for index in range(12):
        s = ds[index]
        assert s.image.shape == (3, 48, 48) and s.image.dtype == torch.float32
        masks, labels = s.instance_masks, s.instance_labels
        n_instances.add(masks.shape[0])
        assert masks.dtype == torch.bool and masks.shape[0] == labels.shape[0]
        assert int(masks.sum(0).max()) <= 1  # instances are disjoint after occlusion
        expect = torch.zeros_like(s.semantic)
        for m, lab in zip(masks, labels):
            expect[m] = lab
        covered = masks.any(0)
        assert torch.equal(s.semantic[covered], expect[covered])
        assert set(s.semantic[~covered].unique().tolist()) <= {0, params.ignore_index}
        assert set(labels.tolist()) <= {1, 2}
    if copy_paste:
        assert max(n_instances) > 1
    else:
        assert n_instances == {1}


def test_dataset_is_a_pure_function_of_seed_and_index():
    params = SynthesisParams(crop_size=48)
    a, b, other = _dataset(params), _dataset(params), _dataset(params, seed=1)
    for index in (0, 7, 123456):
        x, y = a[index], b[index]
        assert torch.equal(x.image, y.image) and torch.equal(x.semantic, y.semantic)
        assert torch.equal(x.instance_masks, y.instance_masks)
    assert not torch.equal(a[5].image, other[5].image)
    assert not torch.equal(a[5].image, a[6].image)


def test_geometry_pads_with_mean_colour_and_ignore():
    params = SynthesisParams(crop_size=32, scale_range=(0.5, 0.5), hflip_prob=0.0)
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    inst = np.zeros((40, 40), np.int64)
    inst[:20] = 1
    img, m = augment_geometry(image, inst, np.random.default_rng(1), params)
    assert img.shape == (32, 32, 3) and m.shape == (32, 32)
    pad = m == -1
    assert pad.sum() == 32 * 32 - 20 * 20  # the 20x20 rescaled image sits in one corner
    from PIL import Image
    scaled = np.asarray(Image.fromarray(image).resize((20, 20), Image.BILINEAR))
    fill = np.round(scaled.reshape(-1, 3).mean(0)).astype(np.uint8)
    assert (img[pad] == fill).all()
    assert (m[~pad] >= 0).all() and (m == 1).sum() == 200


def test_collate_keeps_ragged_instance_stacks():
    ds = _dataset(SynthesisParams(crop_size=48))
    batch = collate_samples([ds[i] for i in range(4)])
    assert batch.images.shape == (4, 3, 48, 48) and batch.semantic.shape == (4, 48, 48)
    assert [m.shape[0] for m in batch.instance_masks] == [ds[i].instance_masks.shape[0] for i in range(4)]


def test_step_batch_sampler_resumes_and_splits_ranks():
    full = list(StepBatchSampler(3, 5))
    assert list(StepBatchSampler(3, 5, start_step=2)) == full[2:]
    ranks = [list(StepBatchSampler(2, 4, rank=r, world_size=2)) for r in range(2)]
    flat = [i for r in ranks for batch in r for i in batch]
    assert len(flat) == len(set(flat)) == 16
    with pytest.raises(ValueError):
        StepBatchSampler(2, 4, rank=2, world_size=2)


def test_missing_image_and_mask_are_named():
    images, annotations, retrieval = _world()
    with pytest.raises(FileNotFoundError, match="im0"):
        CopyPasteDataset(retrieval, ["cat", "dog"], annotations, SynthesisParams(), 0)  # files do not exist
    del annotations["im4"]
    with pytest.raises(FileNotFoundError, match="im4"):
        CopyPasteDataset(retrieval, ["cat", "dog"], annotations, SynthesisParams(), 0, check_files=False)
    with pytest.raises(ValueError, match="unknown synthesis"):
        SynthesisParams.from_dict({"crop": 3})


def test_annotations_from_coco_reads_polygons_and_rle(tmp_path):
    m = np.zeros((10, 12), bool)
    m[2:5, 3:9] = True
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": 10, "width": 12}],
            "categories": [{"id": 7, "name": "dog"}, {"id": 8, "name": "zebra"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "segmentation": _rle(m)},
                            {"id": 2, "image_id": 1, "category_id": 8, "segmentation": _rle(m)},
                            {"id": 3, "image_id": 1, "category_id": 7,
                             "segmentation": [[0.0, 0.0, 4.0, 0.0, 4.0, 4.0, 0.0, 4.0]]}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(coco))
    ann = annotations_from_coco(path, tmp_path, ["cat", "dog"])
    insts = ann[str(tmp_path / "a.png")]
    assert [i.label_id for i in insts] == [2, 2]  # "zebra" is not a training concept
    assert mask_utils.decode(dict(insts[0].rle)).sum() == m.sum()
    assert mask_utils.decode(dict(insts[1].rle)).sum() > 0
