import base64

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from model.rle import (
    decode_rle,
    decode_semantic_png,
    decode_semantic_rle,
    encode_masks,
    encode_semantic_png,
    encode_semantic_rle,
    masks_to_boxes_xywh,
)


def _random_masks(seed: int, n: int = 6, h: int = 17, w: int = 23) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), dtype=bool)
    for k in range(n):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        y1, x1 = rng.integers(y0, h + 1), rng.integers(x0, w + 1)
        masks[k, y0:y1, x0:x1] = True
        masks[k] ^= rng.random((h, w)) < 0.05
    masks[0] = False
    masks[-1] = True
    return masks


def test_encode_masks_round_trips_and_uses_str_counts():
    masks = _random_masks(0)
    rles = encode_masks(masks)
    assert len(rles) == len(masks)
    for mask, rle in zip(masks, rles):
        assert rle["size"] == [17, 23]
        assert isinstance(rle["counts"], str)
        decoded = decode_rle(rle)
        assert decoded.dtype == bool
        np.testing.assert_array_equal(decoded, mask)
        assert int(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()})) == mask.sum()


def test_encode_masks_accepts_tensors_and_empty_batches():
    masks = _random_masks(1)
    assert encode_masks(torch.from_numpy(masks)) == encode_masks(masks)
    assert encode_masks(np.zeros((0, 4, 5), dtype=bool)) == []


def test_encode_and_decode_reject_bad_input():
    with pytest.raises(ValueError, match="bool"):
        encode_masks(np.zeros((2, 3, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="size"):
        decode_rle({"counts": "abc"})
    with pytest.raises(ValueError, match="counts"):
        decode_rle({"size": [2, 2], "counts": [1, 2, 1]})


def test_masks_to_boxes_xywh_matches_pycocotools():
    masks = _random_masks(2, n=20)
    boxes = masks_to_boxes_xywh(torch.from_numpy(masks))
    assert boxes.dtype == torch.float32 and boxes.shape == (20, 4)
    expected = mask_utils.toBbox([{"size": r["size"], "counts": r["counts"].encode()} for r in encode_masks(masks)])
    np.testing.assert_array_equal(boxes.numpy(), expected.astype(np.float32))
    assert boxes[0].tolist() == [0.0, 0.0, 0.0, 0.0]  # empty mask
    assert boxes[-1].tolist() == [0.0, 0.0, 23.0, 17.0]  # full mask


def test_masks_to_boxes_xywh_single_pixel():
    masks = torch.zeros(1, 5, 7, dtype=torch.bool)
    masks[0, 3, 4] = True
    assert masks_to_boxes_xywh(masks).tolist() == [[4.0, 3.0, 1.0, 1.0]]
    assert masks_to_boxes_xywh(torch.zeros(0, 5, 7, dtype=torch.bool)).shape == (0, 4)


@pytest.mark.parametrize(("high", "dtype", "bits"), [(81, np.uint8, 8), (81, np.uint16, 8), (920, np.uint16, 16)])
def test_semantic_png_round_trip(high, dtype, bits):
    rng = np.random.default_rng(3)
    label_map = rng.integers(0, high, size=(31, 45)).astype(dtype)
    label_map[0, 0] = high - 1
    data = encode_semantic_png(label_map)
    raw = base64.b64decode(data)
    assert raw[24] == bits  # PNG IHDR bit depth
    decoded = decode_semantic_png(data)
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, label_map)


def test_semantic_png_rejects_bad_input():
    with pytest.raises(ValueError, match="65535"):
        encode_semantic_png(np.full((2, 2), 70000, dtype=np.int64))
    with pytest.raises(ValueError, match="integers"):
        encode_semantic_png(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="base64"):
        decode_semantic_png("not base64!")
    with pytest.raises(ValueError, match="PNG"):
        decode_semantic_png(base64.b64encode(b"GIF89a....").decode())


def test_semantic_rle_round_trip_lists_present_classes_only():
    rng = np.random.default_rng(4)
    label_map = rng.choice(np.array([0, 3, 7, 300]), size=(19, 26)).astype(np.uint16)
    items = encode_semantic_rle(label_map, num_classes=301)
    assert [item["concept_index"] for item in items] == [0, 3, 7, 300]
    assert all(isinstance(item["segmentation"]["counts"], str) for item in items)
    decoded = decode_semantic_rle(items, (19, 26))
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, label_map)


def test_semantic_rle_rejects_bad_input():
    label_map = np.array([[0, 5]], dtype=np.uint16)
    with pytest.raises(ValueError, match="classes"):
        encode_semantic_rle(label_map, num_classes=5)
    items = encode_semantic_rle(label_map, num_classes=6)
    with pytest.raises(ValueError, match="size"):
        decode_semantic_rle(items, (2, 2))
