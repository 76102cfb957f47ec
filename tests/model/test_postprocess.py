import math

import numpy as np
import pytest
import torch

import model.resample as resample
from model.config import InferenceParams
from model.geometry import letterbox_for
from model.nms import greedy_mask_nms_loop
from model.postprocess import instance_candidates, postprocess, semantic_label_map
from model.rle import decode_rle

CONCEPTS = ["background", "cat", "dog", "car", "tree"]
GRID = 16
IMAGE_HW = (40, 56)  # letterboxed into 64: resized (46, 64), grid rows 0..11 cover the image


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _scene(seed: int, q: int = 14, e: int = 16):
    """Blob-shaped proposals (with duplicates, empties and background ones) over class-coloured features."""
    g = torch.Generator().manual_seed(seed)
    text = _unit(torch.randn(len(CONCEPTS), e, generator=g))
    yy, xx = torch.meshgrid(torch.arange(GRID).float(), torch.arange(GRID).float(), indexing="ij")
    feats = text[0].expand(GRID, GRID, e).clone()
    objects = []
    for k in range(4):
        cy, cx = (torch.rand(2, generator=g) * torch.tensor([11.0, 15.0])).tolist()
        radius = 1.5 + 2.5 * torch.rand(1, generator=g).item()
        label = 1 + k % (len(CONCEPTS) - 1)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        feats[inside] = text[label]
        objects.append((cy, cx, radius))
    feats = _unit(feats + 0.6 * torch.randn(GRID, GRID, e, generator=g))
    probs = torch.zeros(q, GRID, GRID)
    for i in range(q):
        kind = i % 7
        if kind == 6:
            probs[i] = 0.4 * torch.rand(GRID, GRID, generator=g)  # empty at low resolution
            continue
        cy, cx, radius = objects[kind % 4] if kind < 5 else (3.0, 3.0, 2.0)
        cy += torch.randn(1, generator=g).item()
        cx += torch.randn(1, generator=g).item()
        radius *= 0.7 + 0.6 * torch.rand(1, generator=g).item()
        dist = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
        probs[i] = torch.sigmoid(2.0 * (radius - dist) + 0.3 * torch.randn(GRID, GRID, generator=g))
    return probs, feats, text


def _upsample_reference(grid: np.ndarray, image_hw, resized_hw, size) -> np.ndarray:
    """Per-pixel bilinear resampling written from the geometry policy (border clamp), float64."""
    h, w = image_hw
    rh, rw = resized_hw
    gh, gw = grid.shape[-2:]
    gy = np.clip((np.arange(h) + 0.5) * (rh / (h * size)) * gh - 0.5, 0, gh - 1)
    gx = np.clip((np.arange(w) + 0.5) * (rw / (w * size)) * gw - 0.5, 0, gw - 1)
    y0 = np.floor(gy).astype(int)
    x0 = np.floor(gx).astype(int)
    y1, x1 = np.minimum(y0 + 1, gh - 1), np.minimum(x0 + 1, gw - 1)
    ay, ax = (gy - y0)[:, None], (gx - x0)[None, :]
    top = (1 - ax) * grid[..., y0[:, None], x0[None, :]] + ax * grid[..., y0[:, None], x1[None, :]]
    bottom = (1 - ax) * grid[..., y1[:, None], x0[None, :]] + ax * grid[..., y1[:, None], x1[None, :]]
    return (1 - ay) * top + ay * bottom


def _reference_instances(probs, feats, text, box, params):
    """Algorithm 1 per query in float64, then the plain §3.4 loop; returns (label, score, mask) by score."""
    p_all = probs.double().numpy()
    v_all = feats.double().numpy()
    t = text.double().numpy()
    vh = min(GRID, math.ceil(box.resized_hw[0] / box.input_size * GRID))
    vw = min(GRID, math.ceil(box.resized_hw[1] / box.input_size * GRID))
    labels, scores, masks = [], [], []
    for q in range(len(p_all)):
        p = p_all[q, :vh, :vw]
        binary = p > params.mask_threshold
        area = binary.sum()
        if area == 0:
            continue
        objectness = (p * binary).sum() / (area + 1e-7)
        mean = (v_all[:vh, :vw] * binary[:, :, None]).sum(axis=(0, 1)) / (area + 1e-7)
        mean = mean / (np.linalg.norm(mean) + 1e-7)
        class_probs = 1.0 / (1.0 + np.exp(-params.temperature * (t @ mean)))
        label = int(np.argmax(class_probs))
        if label == 0:
            continue
        full = _upsample_reference(p_all[q], box.image_hw, box.resized_hw, box.input_size) > params.mask_threshold
        if not full.any():
            continue
        labels.append(label)
        scores.append(objectness * class_probs.max())
        masks.append(full)
    if not labels:
        return []
    kept = greedy_mask_nms_loop(np.stack(masks), np.array(scores), np.array(labels),
                                params.nms_iou, params.score_threshold)
    kept = [k for k in kept if scores[k] > params.score_threshold][: params.max_instances]
    return [(labels[k], scores[k], masks[k]) for k in kept]


@pytest.mark.parametrize("seed", range(6))
def test_postprocess_matches_per_query_reference(seed):
    probs, feats, text = _scene(seed)
    box = letterbox_for(IMAGE_HW, 64)
    params = InferenceParams()
    pred = postprocess(probs, feats, text, CONCEPTS, box, params)
    expected = _reference_instances(probs, feats, text, box, params)
    assert pred.image_hw == IMAGE_HW and pred.concepts == CONCEPTS
    assert len(pred.instances) == len(expected) > 0
    for inst, (label, score, mask) in zip(pred.instances, expected):
        assert inst.concept_index == label and inst.concept == CONCEPTS[label]
        assert inst.score == pytest.approx(score, rel=1e-5)
        decoded = decode_rle(inst.segmentation)
        np.testing.assert_array_equal(decoded, mask)
        assert inst.area == int(mask.sum())
        ys, xs = np.nonzero(mask)
        assert inst.bbox_xywh == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)


def test_reference_scenes_exercise_nms_and_background():
    probs, feats, text = _scene(0)
    box = letterbox_for(IMAGE_HW, 64)
    params = InferenceParams()
    keep, _, _ = instance_candidates(probs, feats, text, params)
    pred = postprocess(probs, feats, text, CONCEPTS, box, params)
    # Some queries are empty or background, and NMS removes some of the rest.
    assert len(pred.instances) < len(keep) < len(probs)


def test_instance_candidates_scores_and_labels():
    probs, feats, text = _scene(1)
    params = InferenceParams(temperature=3.0, mask_threshold=0.4)
    keep, scores, labels = instance_candidates(probs, feats, text, params)
    assert keep.dtype == torch.int64 and labels.dtype == torch.int64 and scores.dtype == torch.float32
    assert torch.all(keep[1:] > keep[:-1])
    for i, q in enumerate(keep.tolist()):
        binary = probs[q] > 0.4
        mean = feats[binary].sum(0) / binary.sum()
        cos = text @ (mean / mean.norm())
        class_probs = torch.sigmoid(3.0 * cos)
        assert labels[i] == class_probs.argmax() != 0
        assert scores[i] == pytest.approx(float(probs[q][binary].mean() * class_probs.max()), rel=1e-5)
    dropped = sorted(set(range(len(probs))) - set(keep.tolist()))
    assert dropped  # the scene has empty and background queries


def test_semantic_label_map_matches_reference_and_chunks(monkeypatch):
    _, feats, text = _scene(2)
    box = letterbox_for(IMAGE_HW, 64)
    logits = torch.einsum("hwe,ce->chw", feats, text).double().numpy()
    expected = _upsample_reference(logits, box.image_hw, box.resized_hw, box.input_size).argmax(axis=0)
    label_map = semantic_label_map(feats, text, box)
    assert label_map.shape == IMAGE_HW and label_map.dtype == torch.int64
    np.testing.assert_array_equal(label_map.numpy(), expected)
    monkeypatch.setattr(resample, "_CHUNK_ELEMENTS", 1)  # one border cell per chunk
    torch.testing.assert_close(semantic_label_map(feats, text, box), label_map, rtol=0, atol=0)
    pred = postprocess(torch.zeros(0, GRID, GRID), feats, text, CONCEPTS, box, InferenceParams())
    assert pred.semantic.dtype == np.uint16
    np.testing.assert_array_equal(pred.semantic, expected)


def test_postprocess_without_candidates():
    _, feats, text = _scene(3)
    box = letterbox_for(IMAGE_HW, 64)
    params = InferenceParams()
    for probs in (torch.zeros(0, GRID, GRID), torch.full((5, GRID, GRID), 0.2)):
        pred = postprocess(probs, feats, text, CONCEPTS, box, params, semantic=False)
        assert pred.instances == [] and pred.semantic is None


def test_postprocess_all_background():
    probs, _, text = _scene(4)
    feats = text[0].expand(GRID, GRID, text.shape[1]).contiguous()
    pred = postprocess(probs, feats, text, CONCEPTS, letterbox_for(IMAGE_HW, 64), InferenceParams())
    assert pred.instances == []
    assert not pred.semantic.any()


def test_postprocess_max_instances_and_threshold():
    probs, feats, text = _scene(5)
    box = letterbox_for(IMAGE_HW, 64)
    full = postprocess(probs, feats, text, CONCEPTS, box, InferenceParams(), semantic=False).instances
    assert len(full) >= 2
    assert postprocess(probs, feats, text, CONCEPTS, box, InferenceParams(max_instances=0)).instances == []
    one = postprocess(probs, feats, text, CONCEPTS, box, InferenceParams(max_instances=1), semantic=False)
    assert one.instances == full[:1]
    cut = (full[0].score + full[1].score) / 2
    high = postprocess(probs, feats, text, CONCEPTS, box, InferenceParams(score_threshold=cut), semantic=False)
    assert [i.score for i in high.instances] == [i.score for i in full if i.score > cut]


def test_postprocess_is_deterministic_and_chunking_invariant(monkeypatch):
    probs, feats, text = _scene(0)
    box = letterbox_for(IMAGE_HW, 64)
    first = postprocess(probs, feats, text, CONCEPTS, box, InferenceParams())
    monkeypatch.setattr(resample, "_CHUNK_ELEMENTS", 1)  # one border cell per chunk
    second = postprocess(probs, feats, text, CONCEPTS, box, InferenceParams())
    assert first.instances == second.instances
    np.testing.assert_array_equal(first.semantic, second.semantic)


def test_postprocess_rejects_inconsistent_inputs():
    probs, feats, text = _scene(0)
    box = letterbox_for(IMAGE_HW, 64)
    params = InferenceParams()
    with pytest.raises(ValueError, match="concept names"):
        postprocess(probs, feats, text, CONCEPTS[:-1], box, params)
    with pytest.raises(ValueError, match="grid"):
        postprocess(probs[:, :8], feats, text, CONCEPTS, box, params)
    with pytest.raises(ValueError, match="embedding sizes"):
        postprocess(probs, feats, text[:, :8], CONCEPTS, box, params)
    with pytest.raises(ValueError, match="mask_probs"):
        postprocess(probs[0], feats, text, CONCEPTS, box, params)


def test_postprocess_drops_masks_empty_at_full_resolution():
    probs, feats, text = _scene(0)
    box = letterbox_for((64, 64), 64)  # 4 output pixels per grid cell
    lone = torch.zeros(1, GRID, GRID)
    lone[0, 5, 5] = 0.51  # in at low resolution; resampled, no pixel centre gets more than ~0.39
    probs = torch.cat([lone, probs])
    feats[5, 5] = text[1]  # so that query 0 is labelled "cat", not background
    params = InferenceParams()
    keep, _, _ = instance_candidates(probs, feats, text, params)
    assert 0 in keep.tolist()
    pred = postprocess(probs, feats, text, CONCEPTS, box, params, semantic=False)
    expected = _reference_instances(probs, feats, text, box, params)
    assert [(i.concept_index, i.area) for i in pred.instances] == [(lab, int(m.sum())) for lab, _, m in expected]
    assert all(i.area > 0 for i in pred.instances)
