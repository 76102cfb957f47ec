"""Uploaded image bytes -> an RGB PIL image, with the format and pixel-count limits checked before decoding.

The pixel count is read from the image header and checked before any pixel is decoded, so a small file that
would decompress to a huge image (a decompression bomb) is refused cheaply. Pillow's own bomb check is a second
line of defence (its ``DecompressionBombError`` becomes the same 413).

Photos are turned upright by their EXIF orientation (``ZUTIS_EXIF_ORIENTATION``, on by default), so answers are in
the frame a person sees. Multi-picture JPEGs (MPO, written by many phone cameras) are JPEGs: their first picture is
used.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image, UnidentifiedImageError

from model.orientation import apply_exif_orientation
from service.errors import ServiceError

SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
# Pillow's names for variants of a supported format: a multi-picture JPEG (MPO) is a JPEG whose first picture is
# an ordinary baseline or progressive JPEG.
FORMAT_VARIANTS = {"MPO": "JPEG"}


def decode_image(data: bytes, max_pixels: int, exif_orientation: bool = True) -> Image.Image:
    """Decode an uploaded file into an RGB image.

    Args:
        data: the file's bytes, as uploaded.
        max_pixels: the largest ``width * height`` accepted.
        exif_orientation: turn the image upright by its EXIF orientation (width and height swap for 90 and 270
            degrees); False keeps the stored pixel grid.

    Returns:
        an ``RGB`` PIL image (first frame of animations and multi-picture JPEGs), upright unless
        ``exif_orientation`` is False.

    Raises:
        ServiceError: 415 not an image or not a supported format; 413 more pixels than ``max_pixels``; 400 an
        image of a supported format whose data cannot be decoded (truncated, corrupt) or that is empty.
    """
    if not data:
        raise ServiceError("invalid_image", "the uploaded image file is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=None)
    except UnidentifiedImageError:
        raise ServiceError("unsupported_media_type", "the upload is not an image in a supported format "
                           f"({', '.join(SUPPORTED_FORMATS)})") from None
    except Image.DecompressionBombError as exc:
        raise too_many_pixels(exc, max_pixels) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ServiceError("invalid_image", f"the image header could not be read ({exc})") from None
    if FORMAT_VARIANTS.get(image.format, image.format) not in SUPPORTED_FORMATS:
        raise ServiceError("unsupported_media_type", f"{image.format} images are not supported; use one of "
                           f"{', '.join(SUPPORTED_FORMATS)}")
    width, height = image.size
    if width < 1 or height < 1:
        raise ServiceError("invalid_image", f"the image is empty ({width}x{height} pixels)")
    if width * height > max_pixels:
        raise ServiceError("image_too_large", f"the image is {width}x{height} = {width * height:,} pixels; "
                           f"the limit is {max_pixels:,}")
    try:
        image.seek(0)
        image.load()
        if exif_orientation:
            image = apply_exif_orientation(image)
        return to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise too_many_pixels(exc, max_pixels) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ServiceError("invalid_image", f"the {image.format} image could not be decoded ({exc})") from None


def too_many_pixels(exc: Image.DecompressionBombError, max_pixels: int) -> ServiceError:
    """413 for an image Pillow refused as a decompression bomb (over twice its own ``Image.MAX_IMAGE_PIXELS``,
    before the service's check could run), quoting the service's limit, not Pillow's."""
    match = re.search(r"\((\d+) pixels\)", str(exc))
    if match is None:
        return ServiceError("image_too_large", f"the image has more pixels than the limit of {max_pixels:,}")
    pixels = int(match.group(1))
    if pixels > max_pixels:
        return ServiceError("image_too_large", f"the image is {pixels:,} pixels; the limit is {max_pixels:,}")
    # Only when ZUTIS_MAX_IMAGE_PIXELS is set above what Pillow decodes at all.
    return ServiceError("image_too_large", f"the image is {pixels:,} pixels, more than the image decoder accepts "
                        f"({2 * (Image.MAX_IMAGE_PIXELS or 0):,}), although within the limit of {max_pixels:,}")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. 16-bit greyscale (and 32-bit values above 255) are scaled from 0..65535
    rather than clipped; alpha is dropped (the colour under transparent pixels is used as it is)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 255.0 if not image.mode.startswith("I;16") and values.max() <= 255 else 65535.0
        grey = np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), mode="RGB")
    return image.convert("RGB")
