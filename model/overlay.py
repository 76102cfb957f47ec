"""Drawing a prediction over its image: translucent masks, boxes, and "concept score" labels."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from model.rle import decode_rle
from model.schema import SegmentResponse


def concept_colour(index: int) -> tuple[int, int, int]:
    """A stable, well-separated RGB colour for concept ``index`` (golden-ratio hue steps)."""
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_overlay(image: Image.Image, response: SegmentResponse, alpha: float = 0.5,
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
        mask = decode_rle(inst.segmentation.model_dump()).astype(bool)
        base[mask] = (1 - alpha) * base[mask] + alpha * np.array(concept_colour(inst.concept_index), np.float32)
    out = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for inst in response.instances:
        x, y, bw, bh = inst.bbox
        colour = concept_colour(inst.concept_index)
        draw.rectangle([x, y, x + bw - 1, y + bh - 1], outline=colour, width=max(1, min(h, w) // 200))
        label = f"{inst.concept} {inst.score:.2f}"
        tx, ty = x, max(0, y - 11)
        left, top, right, bottom = draw.textbbox((tx, ty), label, font=font)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=(0, 0, 0))
        draw.text((tx, ty), label, fill=colour, font=font)
    return out
