"""Drawing a prediction over its image: translucent masks, boxes, and "concept score" labels.

Labels are sized to the image (about 1/40 of its shorter side, 8 px at least) and laid out so that each lies wholly
inside the image and overlaps no other: above its box, else inside its top edge, else below it, else further
down; a label with no free place is left out (the highest scores are placed first).

``draw_overlay`` reads an answer through the small protocols below (what it reads of ``model.answer``'s
``SegmentResponse``, which ``python -m model.predict`` passes); instance masks may be RLE or polygons.
"""

from __future__ import annotations

import colorsys
from typing import Protocol, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from model.answer import segmentation_to_mask


class _MaskRLE(Protocol):
    @property
    def size(self) -> list[int]: ...  # [H, W]

    @property
    def counts(self) -> str: ...  # COCO compressed RLE


class _DrawnInstance(Protocol):
    @property
    def concept(self) -> str: ...

    @property
    def concept_index(self) -> int: ...

    @property
    def score(self) -> float: ...

    @property
    def bbox(self) -> list[float]: ...  # [x, y, w, h] in pixels

    @property
    def segmentation(self) -> _MaskRLE | list[list[float]]: ...  # COCO RLE or polygons


class _ImageSize(Protocol):
    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...


class DrawableAnswer(Protocol):
    """What ``draw_overlay`` reads of an answer: ``model.answer.SegmentResponse`` has it."""

    @property
    def image(self) -> _ImageSize: ...

    @property
    def instances(self) -> Sequence[_DrawnInstance]: ...


def concept_colour(index: int) -> tuple[int, int, int]:
    """A stable, well-separated RGB colour for concept ``index`` (golden-ratio hue steps)."""
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


Box = tuple[float, float, float, float]  # left, top, right, bottom (pixels, exclusive right/bottom)

MIN_FONT_PX = 8


def label_font_size(width: int, height: int) -> int:
    """Font size in pixels for an image of ``width`` x ``height``: 1/40 of the shorter side, 8 at least."""
    return max(MIN_FONT_PX, round(min(width, height) / 40))


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def fit_label(draw: ImageDraw.ImageDraw, concept: str, score: float, font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
              max_width: int) -> tuple[str, tuple[int, int]]:
    """The label ``"<concept> <score>"``, with the concept shortened with "..." until it is at most ``max_width``
    pixels wide (the score is kept), and its ``(width, height)`` in pixels."""
    name = concept
    while True:
        text = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        size = (int(right - min(0, left)), int(bottom - min(0, top)))
        if size[0] <= max_width or not name:
            return text, size
        name = name[:-4] + "..." if len(name) > 4 else ""


def layout_labels(boxes_xywh: list[tuple[float, float, float, float]], label_sizes: list[tuple[int, int]],
                  width: int, height: int, pad: int = 1) -> list[Box | None]:
    """Where to put each label: a ``(left, top, right, bottom)`` rectangle inside the image overlapping no other
    label, or None when there is no room. Labels are placed in order (give them highest score first).

    Args:
        boxes_xywh: each instance's box ``[x, y, w, h]`` (pixels).
        label_sizes: each label's text ``(width, height)`` in pixels; the rectangle adds ``pad`` on each side.
        width, height: the image size in pixels.
    """
    placed: list[Box] = []
    out: list[Box | None] = []
    for (x, y, bw, bh), (tw, th) in zip(boxes_xywh, label_sizes, strict=True):
        w, h = tw + 2 * pad, th + 2 * pad
        if w > width or h > height:
            out.append(None)
            continue
        left = min(max(0.0, x), width - w)
        candidates = [y - h, y, y + bh] + [y + bh + k * h for k in range(1, 4)]
        spot = None
        for top in candidates:
            top = min(max(0.0, top), height - h)
            rect = (left, top, left + w, top + h)
            if not any(_overlaps(rect, other) for other in placed):
                spot = rect
                break
        if spot is not None:
            placed.append(spot)
        out.append(spot)
    return out


def draw_overlay(image: Image.Image, response: DrawableAnswer, alpha: float = 0.5,
                 semantic: np.ndarray | None = None) -> Image.Image:
    """An RGB copy of ``image`` with the response's instances drawn on it.

    ``semantic``: optionally an (H, W) label map, tinted lightly underneath the instances (background untinted).
    """
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = base.shape[:2]
    if (response.image.height, response.image.width) != (h, w):
        raise ValueError(f"response is for a {response.image.width}x{response.image.height} image, "
                         f"got {w}x{h}")
    if semantic is not None:
        for idx in np.unique(semantic):
            if idx == 0:
                continue
            sel = semantic == idx
            base[sel] = 0.8 * base[sel] + 0.2 * np.array(concept_colour(int(idx)), dtype=np.float32)
    for inst in reversed(response.instances):  # highest score drawn last, on top
        segmentation = inst.segmentation
        if not isinstance(segmentation, list):  # an RLE, read through the protocol
            segmentation = {"size": segmentation.size, "counts": segmentation.counts}
        mask = segmentation_to_mask(segmentation, (h, w))
        base[mask] = (1 - alpha) * base[mask] + alpha * np.array(concept_colour(inst.concept_index), np.float32)
    out = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=label_font_size(w, h))
    line = max(1, min(h, w) // 200)
    fitted = [fit_label(draw, inst.concept, inst.score, font, w - 2) for inst in response.instances]
    labels = [text for text, _ in fitted]
    sizes = [size for _, size in fitted]
    spots = layout_labels([tuple(inst.bbox) for inst in response.instances], sizes, w, h)
    for inst in response.instances:
        x, y, bw, bh = inst.bbox
        draw.rectangle([x, y, x + bw - 1, y + bh - 1], outline=concept_colour(inst.concept_index), width=line)
    for inst, label, spot in zip(response.instances, labels, spots, strict=True):
        if spot is None:
            continue
        left, top, right, bottom = spot
        draw.rectangle([left, top, right - 1, bottom - 1], fill=(0, 0, 0))
        draw.text((left + 1, top + 1), label, fill=concept_colour(inst.concept_index), font=font)
    return out
