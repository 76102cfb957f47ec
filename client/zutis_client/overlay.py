"""Drawing a ``SegmentResult`` over its image."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from zutis_client.errors import ZutisUsageError
from zutis_client.upload import ImageInput, pictures_as_sent

if TYPE_CHECKING:
    from zutis_client.result import SegmentResult

# The demo page's colours: one per instance, in score order.
PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128),
    (128, 128, 0), (255, 225, 25), (220, 190, 255), (170, 255, 195),
)


def overlay_image(image: ImageInput, result: SegmentResult, alpha: float = 0.5, labels: bool = True) -> Image.Image:
    """``draw_overlay`` on the picture the service segmented in ``image`` (a path, bytes, a file, a PIL image or
    an array, as sent): a photo is turned upright by its EXIF orientation as the service does, or left in its
    stored grid when that is the size the answer describes (a service run with ``ZUTIS_EXIF_ORIENTATION=false``).
    A square photo whose orientation swaps its axes is drawn upright (the service's default).

    Raises:
        ZutisUsageError: ``image_mismatch`` (not the image that was sent), ``unreadable_image``.
    """
    pictures = pictures_as_sent(image)
    for picture in pictures:
        if picture.size == (result.width, result.height):
            return draw_overlay(picture, result, alpha=alpha, labels=labels)
    return draw_overlay(pictures[0], result, alpha=alpha, labels=labels)  # raises image_mismatch


def draw_overlay(image: Image.Image, result: SegmentResult, alpha: float = 0.5, labels: bool = True) -> Image.Image:
    """A copy of ``image`` (RGB, the size of the answer, upright as the service saw it) with each instance's mask
    blended at ``alpha`` in its own colour, the best-scoring instance on top, and (``labels``) its box and
    "concept score" drawn.

    Raises:
        ZutisUsageError: ``image_mismatch``: ``image`` is not the size the answer describes (also a ValueError).
    """
    if image.size != (result.width, result.height):
        raise ZutisUsageError("image_mismatch", f"the image is {image.size[0]} x {image.size[1]}, the answer "
                              f"{result.width} x {result.height}: overlay the image that was sent")
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    for index in reversed(range(len(result.instances))):
        mask = result.instances[index].mask
        colour = np.array(PALETTE[index % len(PALETTE)], dtype=np.float32)
        pixels[mask] = (1.0 - alpha) * pixels[mask] + alpha * colour
    picture = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
    if labels:
        draw = ImageDraw.Draw(picture)
        for index, instance in enumerate(result.instances):
            colour = PALETTE[index % len(PALETTE)]
            x, y, w, h = instance.bbox
            draw.rectangle([x, y, x + max(w - 1, 0), y + max(h - 1, 0)], outline=colour)
            text = f"{instance.concept} {instance.score:.2f}"
            left, top, right, bottom = draw.textbbox((x, y), text)
            # Above the box, or inside it when the box touches the top edge.
            shift = bottom - top + 2 if y >= bottom - top + 2 else 0
            draw.rectangle([left, top - shift, right, bottom - shift], fill=colour)
            draw.text((x, y - shift), text, fill=(255, 255, 255))
    return picture
