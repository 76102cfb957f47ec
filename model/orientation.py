"""EXIF orientation: turning a photo's stored pixel grid into the upright picture a person sees.

Phone cameras store pixels in the sensor's grid and record how to turn them in the EXIF ``Orientation`` tag
(1 = as stored, 6 = turn 90 degrees clockwise, ...). Viewers apply it; a model must too, or its masks and boxes do
not line up with the picture the user sees. The service, ``python -m model.predict`` and ``python -m
model.evaluate`` apply it by default (and can be told not to), so their answers are in the upright frame.
"""

from __future__ import annotations

import logging

from PIL import Image, ImageOps

log = logging.getLogger(__name__)

ORIENTATION_TAG = 0x0112


def exif_orientation(image: Image.Image) -> int:
    """The image's EXIF orientation (1..8), 1 when it has none or when the EXIF block cannot be read."""
    try:
        value = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block is treated as no EXIF, never as a failure
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """``image`` turned upright by its EXIF orientation; the image itself (not a copy) when there is none.

    A rotation by 90 or 270 degrees swaps width and height (a 360 x 640 stored grid with orientation 6 becomes
    640 x 360). The returned image has no orientation tag left. An unreadable EXIF block leaves the image as stored.
    """
    if exif_orientation(image) == 1:
        return image
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on malformed EXIF
        log.warning("EXIF orientation ignored: %s", exc)
        return image
    return upright if upright is not None else image
