"""The client's picture of a photo is the service's: EXIF orientation applied the same way for all 8 values, the
stored grid when the service is told not to, and overlays of phone photos that line up with the answer."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.upload import decode_image
from zutis_client import ZutisError
from zutis_client.overlay import overlay_image
from zutis_client.result import SegmentResult
from zutis_client.upload import open_image, pictures_as_sent

STORED_W, STORED_H = 48, 30


def photo(orientation: int | None, fmt: str = "JPEG") -> bytes:
    """A 48 x 30 picture whose every pixel differs from its mirror images, with EXIF orientation ``orientation``."""
    y, x = np.mgrid[0:STORED_H, 0:STORED_W]
    pixels = np.stack([x * 5, y * 8, (x * y) % 256], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", [None, 1, 2, 3, 4, 5, 6, 7, 8])
def test_client_picture_is_the_service_picture_for_every_orientation(orientation, fmt):
    data = photo(orientation, fmt)
    service_upright = np.asarray(decode_image(data, 10**6, exif_orientation=True))
    service_stored = np.asarray(decode_image(data, 10**6, exif_orientation=False))
    client_pictures = [np.asarray(p) for p in pictures_as_sent(data)]
    assert np.array_equal(np.asarray(open_image(data)), service_upright)
    assert np.array_equal(client_pictures[0], service_upright)
    assert np.array_equal(client_pictures[-1], service_stored)
    turned = orientation not in (None, 1)
    assert len(client_pictures) == (2 if turned else 1)
    assert service_upright.shape[:2] == ((STORED_W, STORED_H) if orientation in (5, 6, 7, 8) else
                                         (STORED_H, STORED_W))


def test_an_out_of_range_or_corrupt_orientation_is_ignored_by_both():
    for data in (photo(9), photo(0)):
        assert np.array_equal(np.asarray(open_image(data)), np.asarray(decode_image(data, 10**6)))


def fake_answer(width: int, height: int) -> SegmentResult:
    """An answer of one instance covering the top-left quarter, for drawing."""
    from pycocotools import mask as mask_utils

    mask = np.zeros((height, width), dtype=np.uint8)
    mask[: height // 2, : width // 2] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode()
    return SegmentResult.from_json({
        "model": "m", "image": {"width": width, "height": height}, "concepts": ["background", "thing"],
        "instances": [{"concept": "thing", "concept_index": 1, "score": 0.9, "bbox": [0, 0, width // 2, height // 2],
                       "segmentation": rle, "area": int(mask.sum())}],
        "semantic": None, "timings": {"queue_ms": 0, "inference_ms": 0, "total_ms": 0}})


def test_overlay_of_a_turned_photo_uses_the_frame_the_answer_is_in():
    data = photo(6)
    upright = fake_answer(STORED_H, STORED_W)  # the service's default: 30 x 48
    drawn = overlay_image(data, upright, labels=False)
    assert drawn.size == (STORED_H, STORED_W)
    picture = np.asarray(open_image(data)).astype(np.float32)
    changed = np.any(np.asarray(drawn).astype(np.float32) != picture, axis=-1)
    assert changed[: STORED_W // 2, : STORED_H // 2].all() and not changed[STORED_W // 2:].any()
    stored = fake_answer(STORED_W, STORED_H)  # a service run with ZUTIS_EXIF_ORIENTATION=false
    assert overlay_image(data, stored, labels=False).size == (STORED_W, STORED_H)
    with pytest.raises(ZutisError) as mismatch:
        overlay_image(data, fake_answer(10, 10))
    assert mismatch.value.type == "image_mismatch" and isinstance(mismatch.value, ValueError)
    with pytest.raises(ZutisError) as unreadable:
        overlay_image(b"not an image", upright)
    assert unreadable.value.type == "unreadable_image"
