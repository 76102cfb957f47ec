"""Overlay labels are sized to the image and laid out inside it without overlapping."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from model.overlay import _overlaps, draw_overlay, fit_label, label_font_size, layout_labels
from model.rle import encode_masks
from service.schema import SegmentResponse


def response_for(width: int, height: int, boxes: list[tuple[int, int, int, int]]) -> SegmentResponse:
    instances = []
    for k, (x, y, w, h) in enumerate(boxes):
        mask = np.zeros((height, width), dtype=bool)
        mask[y:y + h, x:x + w] = True
        instances.append({"concept": f"concept number {k}", "concept_index": k + 1, "score": 0.9 - k / 100,
                          "bbox": [float(x), float(y), float(w), float(h)], "area": int(mask.sum()),
                          "segmentation": encode_masks(mask[None])[0]})
    return SegmentResponse.model_validate({
        "model": "m", "image": {"width": width, "height": height},
        "concepts": ["background"] + [f"concept number {k}" for k in range(len(boxes))],
        "instances": instances, "semantic": None})


def test_font_size_follows_the_image():
    assert label_font_size(128, 128) == 8
    assert label_font_size(1920, 1080) == 27
    assert label_font_size(640, 480) == 12


@pytest.mark.parametrize("width,height", [(128, 128), (1920, 1080), (64, 200)])
def test_labels_lie_inside_the_image_and_never_overlap(width, height):
    rng = np.random.default_rng(width)
    boxes = [tuple(int(v) for v in (rng.integers(0, width - 10), rng.integers(0, height - 10), 10, 10))
             for _ in range(6)] + [(0, 0, width, height), (width - 5, height - 5, 5, 5)]
    font = ImageFont.load_default(size=label_font_size(width, height))
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    sizes = [fit_label(draw, f"concept number {k}", 0.9, font, width - 2)[1] for k in range(len(boxes))]
    spots = layout_labels(boxes, sizes, width, height)
    placed = [s for s in spots if s is not None]
    assert placed, "no label placed at all"
    for spot, (tw, th) in zip(spots, sizes):
        if spot is None:
            continue
        left, top, right, bottom = spot
        assert 0 <= left and 0 <= top and right <= width and bottom <= height, spot
        assert right - left >= tw and bottom - top >= th
    for i, a in enumerate(placed):
        for b in placed[i + 1:]:
            assert not _overlaps(a, b), (a, b)
    if (width, height) == (1920, 1080):
        assert all(s is not None for s in spots), "plenty of room: every label is shown"


def test_long_labels_are_shortened_to_fit():
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = ImageFont.load_default(size=8)
    text, (width, _) = fit_label(draw, "a very long concept name indeed", 0.87, font, 60)
    assert width <= 60 and text.endswith("... 0.87") and text.startswith("a ve")
    assert fit_label(draw, "cat", 0.5, font, 60)[0] == "cat 0.50"


def test_overlay_draws_readable_labels_at_both_extremes():
    for width, height in ((128, 128), (1920, 1080)):
        image = Image.new("RGB", (width, height), (128, 128, 128))
        response = response_for(width, height, [(10, 40, 50, 40), (30, 60, 60, 50), (width // 2, 5, 30, 30)])
        out = np.asarray(draw_overlay(image, response))
        assert out.shape == (height, width, 3)
        black = (out.sum(axis=2) == 0)  # label backgrounds are black; the image has no black
        rows = np.flatnonzero(black.any(axis=1))
        assert rows.size, "no label drawn"
        # the tallest black run is one label's height: about the font size plus padding
        heights = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], black.any(axis=1).astype(int), [0]]))))[::2]
        assert max(heights) >= label_font_size(width, height) - 1
