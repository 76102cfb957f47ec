"""What the client accepts as an image: a path, bytes, a binary file, a PIL image or a numpy array."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ImageInput = Any  # str | os.PathLike | bytes | BinaryIO | PIL.Image.Image | numpy.ndarray (H, W[, 3|4]) uint8


def to_upload(image: ImageInput) -> tuple[str, bytes, str]:
    """``(file name, bytes, content type)`` of the multipart ``image`` field. Files and bytes are sent as they
    are (the service detects the format); PIL images and arrays are encoded as PNG (lossless)."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        return path.name, path.read_bytes(), "application/octet-stream"
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
    raise TypeError(f"cannot send a {type(image).__name__} as an image: give a path, bytes, a binary file, a PIL "
                    "image or a uint8 numpy array")


def to_base64(image: ImageInput) -> str:
    """The image for a JSON body's ``image`` field: the bytes ``to_upload`` would send, base64-encoded."""
    return base64.b64encode(to_upload(image)[1]).decode("ascii")


def open_image(image: ImageInput) -> Image.Image:
    """The same inputs as ``to_upload``, as an RGB PIL image (for drawing)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(_as_uint8(image)).convert("RGB")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(image))).convert("RGB")
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if hasattr(image, "read"):
        return Image.open(io.BytesIO(image.read())).convert("RGB")
    raise TypeError(f"cannot open a {type(image).__name__} as an image")


def _as_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 (H, W[, 3|4]), not {array.dtype}")
    return array
