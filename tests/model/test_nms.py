import math

import numpy as np
import pytest
import torch

import model.mask_iou
from model.mask_iou import mask_areas, mask_iou_matrix
from model.nms import greedy_mask_nms_loop, mask_nms


def _numpy_iou(masks: np.ndarray) -> np.ndarray:
    n = len(masks)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            inter = np.logical_and(masks[i], masks[j]).sum()
            union = np.logical_or(masks[i], masks[j]).sum()
            out[i, j] = inter / (union + 1e-7)
    return out


def _random_case(rng: np.random.Generator, size: int = 20):
    """Masks jittered around a few prototype rectangles/blobs so that IoUs straddle 0.3."""
    n = int(rng.integers(0, 13))
    yy, xx = np.mgrid[:size, :size]
    prototypes = []
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(4, size - 4, 2)
        hy, hx = rng.uniform(2, 7, 2)
        prototypes.append((cy, cx, hy, hx))
    masks = np.zeros((n, size, size), dtype=bool)
    for k in range(n):
        cy, cx, hy, hx = prototypes[int(rng.integers(len(prototypes)))]
        cy, cx = cy + rng.normal(0, 2.5), cx + rng.normal(0, 2.5)
        hy, hx = hy * rng.uniform(0.6, 1.5), hx * rng.uniform(0.6, 1.5)
        if rng.random() < 0.5:
            masks[k] = (np.abs(yy - cy) <= hy) & (np.abs(xx - cx) <= hx)
        else:
            masks[k] = ((yy - cy) / hy) ** 2 + ((xx - cx) / hx) ** 2 <= 1.0
    labels = rng.integers(0, 3, size=n)
    scores = rng.uniform(0.0, 1.0, size=n)
    low = rng.random(n) < 0.25
    scores[low] = rng.uniform(0.0, 0.002, size=int(low.sum()))
    assert len(np.unique(scores)) == n
    return masks, scores.astype(np.float32), labels


def test_mask_iou_matrix_matches_numpy():
    rng = np.random.default_rng(0)
    masks = rng.random((7, 9, 11)) < 0.4
    masks[3] = False  # an empty mask: IoU 0 with everything, itself included
    iou = mask_iou_matrix(torch.from_numpy(masks))
    assert iou.dtype == torch.float64 and iou.shape == (7, 7)
    np.testing.assert_array_equal(iou.numpy(), _numpy_iou(masks))
    flat = mask_iou_matrix(torch.from_numpy(masks.reshape(7, -1)))
    np.testing.assert_array_equal(flat.numpy(), iou.numpy())


def test_mask_iou_matrix_chunked_accumulation_is_exact(monkeypatch):
    monkeypatch.setattr(model.mask_iou, "_EXACT_F32_COUNT", 7)  # forces 7-pixel chunks
    rng = np.random.default_rng(1)
    masks = rng.random((5, 6, 10)) < 0.5
    np.testing.assert_array_equal(mask_iou_matrix(torch.from_numpy(masks)).numpy(), _numpy_iou(masks))


@pytest.mark.parametrize("shape", [(3, 17, 19), (2, 255), (4, 600), (1, 1), (0, 5, 5), (3, 0)])
def test_mask_areas_counts_exactly(shape):
    masks = torch.rand(shape) < 0.7
    if masks.numel():
        masks[0] = True  # full rows: block counts reach 255
    assert torch.equal(mask_areas(masks), masks.reshape(shape[0], math.prod(shape[1:])).sum(dim=1))
    assert mask_areas(masks).dtype == torch.int64


def test_mask_iou_matrix_rejects_non_bool():
    with pytest.raises(ValueError, match="bool"):
        mask_iou_matrix(torch.zeros(2, 3, 3))


@pytest.fixture
def one_thread():
    # Thousands of tiny matmuls: a second OpenMP thread only adds wake-up latency (badly so on a busy machine).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_mask_nms_equals_reference_loop_on_random_cases(one_thread):
    rng = np.random.default_rng(2024)
    near_threshold = suppressed = floored = 0
    for _ in range(1000):
        masks, scores, labels = _random_case(rng)
        expected = greedy_mask_nms_loop(masks, scores, labels, 0.3, 0.001)
        args = torch.from_numpy(masks), torch.from_numpy(scores), torch.from_numpy(labels), 0.3, 0.001
        for strategy in ("matrix", "greedy"):
            got = mask_nms(*args, strategy=strategy)
            assert got.dtype == torch.int64
            np.testing.assert_array_equal(got.numpy(), expected)
        if len(masks) > 1:
            iou = _numpy_iou(masks)[np.triu_indices(len(masks), 1)]
            near_threshold += int(((iou > 0.2) & (iou < 0.4)).sum())
            suppressed += int(((iou > 0.3) & (iou < 1.0)).any())
            floored += int((scores <= 0.001).sum() > 1)
    # The cases must actually exercise the decisions being compared.
    assert near_threshold > 1000 and suppressed > 300 and floored > 100


@pytest.mark.parametrize("strategy", ["matrix", "greedy"])
def test_mask_nms_accepts_flat_masks(strategy):
    masks = torch.zeros(3, 12, dtype=torch.bool)
    masks[0, :6] = masks[1, 1:7] = masks[2, 6:] = True
    result = mask_nms(masks, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1, 1, 1]), strategy=strategy)
    assert result.tolist() == [0, 2]


def test_mask_nms_keeps_best_and_suppresses_same_label_only():
    a = torch.zeros(4, 10, 10, dtype=torch.bool)
    a[0, :5, :5] = True
    a[1, :5, :5] = True  # duplicate of 0, same label
    a[2, :5, :5] = True  # duplicate of 0, other label
    a[3, 6:, 6:] = True  # disjoint, same label as 0
    scores = torch.tensor([0.5, 0.9, 0.4, 0.3])
    labels = torch.tensor([1, 1, 2, 1])
    assert mask_nms(a, scores, labels).tolist() == [1, 2, 3]


def test_mask_nms_threshold_is_strict():
    masks = torch.zeros(2, 1, 13, dtype=torch.bool)
    masks[0, 0, :10] = True
    masks[1, 0, 7:10] = True  # IoU 3 / 10 (just under 0.3 with the 1e-7): not suppressed
    assert mask_nms(masks, torch.tensor([0.9, 0.8]), torch.tensor([1, 1])).tolist() == [0, 1]
    masks[1, 0, 10:13] = True
    masks[1, 0, 6] = True  # IoU 4 / 13 > 0.3: suppressed
    assert mask_nms(masks, torch.tensor([0.9, 0.8]), torch.tensor([1, 1])).tolist() == [0]


def test_mask_nms_score_floor_spares_only_the_best_of_each_label():
    masks = torch.zeros(4, 4, 8, dtype=torch.bool)
    for k in range(4):
        masks[k, :, 2 * k:2 * k + 2] = True  # all disjoint
    scores = torch.tensor([0.0005, 0.0008, 0.5, 0.001], dtype=torch.float64)  # exactly the floor, not > it
    labels = torch.tensor([3, 3, 4, 4])
    # label 3: best (0.0008) kept though under the floor, 0.0005 dropped; label 4: 0.001 is not > floor.
    assert mask_nms(masks, scores, labels, 0.3, 0.001).tolist() == [2, 1]
    assert greedy_mask_nms_loop(masks, scores, labels, 0.3, 0.001).tolist() == [2, 1]


def test_mask_nms_ties_break_by_index():
    masks = torch.ones(3, 4, 4, dtype=torch.bool)
    scores = torch.tensor([0.5, 0.7, 0.7])
    labels = torch.tensor([1, 1, 1])
    assert mask_nms(masks, scores, labels).tolist() == [1]
    assert greedy_mask_nms_loop(masks, scores, labels).tolist() == [1]
    disjoint = torch.eye(3, dtype=torch.bool).reshape(3, 3, 1)
    assert mask_nms(disjoint, torch.tensor([0.7, 0.7, 0.7]), labels).tolist() == [0, 1, 2]


def test_mask_nms_empty_and_bad_input():
    empty = mask_nms(torch.zeros(0, 5, 5, dtype=torch.bool), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    assert empty.dtype == torch.int64 and empty.numel() == 0
    masks = torch.ones(2, 3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="shapes"):
        mask_nms(masks, torch.ones(3), torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer"):
        mask_nms(masks, torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="bool"):
        mask_nms(masks.float(), torch.ones(2), torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="strategy"):
        mask_nms(masks, torch.ones(2), torch.ones(2, dtype=torch.int64), strategy="fast")
    with pytest.raises(ValueError, match="finite"):
        mask_nms(masks, torch.tensor([0.5, float("nan")]), torch.ones(2, dtype=torch.int64))
