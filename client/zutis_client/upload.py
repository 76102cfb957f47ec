"""What the client accepts as an image (a path, bytes, a binary file, a PIL image or a numpy array), how it is sent,
and the picture the service sees in it (EXIF orientation applied as the service applies it)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from zutis_client.errors import ZutisUsageError

ImageInput = Any  # str | os.PathLike | bytes | BinaryIO | PIL.Image.Image | numpy.ndarray (H, W[, 3|4]) uint8
ORIENTATION_TAG = 0x0112


def to_upload(image: ImageInput) -> tuple[str, bytes, str]:
    """``(file name, bytes, content type)`` of the multipart ``image`` field. Files and bytes are sent as they
    are (the service detects the format); PIL images and arrays are encoded as PNG (lossless, no EXIF block).

    Raises:
        ZutisUsageError: ``unreadable_image`` (a file that cannot be read) or ``invalid_argument`` (not an image
            input).
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        return path.name, read_file(path), "application/octet-stream"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return "image", bytes(image), "application/octet-stream"
    if isinstance(image, np.ndarray):
        image = Image.fromarray(_as_uint8(image))
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "image.png", buffer.getvalue(), "image/png"
    if hasattr(image, "read"):
        data = image.read()
        return Path(getattr(image, "name", "image")).name, data, "application/octet-stream"
    raise ZutisUsageError("invalid_argument", f"cannot send a {type(image).__name__} as an image: give a path, "
                          "bytes, a binary file, a PIL image or a uint8 numpy array")


def pictures_as_sent(image: ImageInput) -> list[Image.Image]:
    """The RGB picture(s) the service may have segmented for this input, the likelier first: for a file or bytes,
    the picture turned upright by its EXIF orientation (the service's default), then, when that differs, the
    stored pixel grid (a service run with ``ZUTIS_EXIF_ORIENTATION=false``); a PIL image or array as it is (it is
    sent as PNG, without EXIF).

    Raises:
        ZutisUsageError: ``unreadable_image`` (cannot be read or decoded) or ``invalid_argument``.
    """
    if isinstance(image, Image.Image):
        return [image.convert("RGB")]
    if isinstance(image, np.ndarray):
        return [Image.fromarray(_as_uint8(image)).convert("RGB")]
    if isinstance(image, (str, Path)):
        data = read_file(Path(image))
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif hasattr(image, "read"):
        data = image.read()
    else:
        raise ZutisUsageError("invalid_argument", f"cannot open a {type(image).__name__} as an image")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            turned = upright_picture(opened)
            stored = opened.convert("RGB")
            upright = stored if turned is opened else turned.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ZutisUsageError("unreadable_image", f"the image could not be decoded ({exc})") from None
    return [stored] if upright is stored else [upright, stored]


def to_base64(image: ImageInput) -> str:
    """The image for a JSON body's ``image`` field: the bytes ``to_upload`` would send, base64-encoded."""
    return base64.b64encode(to_upload(image)[1]).decode("ascii")


def open_image(image: ImageInput) -> Image.Image:
    """The same inputs as ``to_upload``, as the RGB picture the service segments by default (upright by EXIF)."""
    return pictures_as_sent(image)[0]


def upright_picture(image: Image.Image) -> Image.Image:
    """``image`` turned upright by its EXIF orientation exactly as the service does (model/orientation.py, which
    the client cannot import): Pillow's ``ImageOps.exif_transpose`` for orientations 2-8, the image itself for 1,
    none, an out-of-range value or an EXIF block that cannot be read."""
    try:
        orientation = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block is treated as no EXIF, never as a failure
        return image
    if not isinstance(orientation, int) or not 2 <= orientation <= 8:
        return image
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - Pillow raises many types on malformed EXIF; the service then uses the grid
        return image
    return upright if upright is not None else image


def read_file(path: Path) -> bytes:
    """The bytes of the file ``path``; ``ZutisUsageError`` (``unreadable_image``) naming it if it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ZutisUsageError("unreadable_image", f"cannot read {path}: {exc.strerror or exc}") from None


def _as_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ZutisUsageError("invalid_argument", f"image arrays must be uint8 (H, W[, 3|4]), not {array.dtype}")
    return array
