"""Decoding uploads: every supported mode becomes 8-bit RGB at the file's own size; limits before decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.errors import ServiceError
from service.upload import decode_image


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("mode,format", [("RGB", "PNG"), ("RGBA", "PNG"), ("L", "PNG"), ("LA", "PNG"),
                                         ("P", "PNG"), ("1", "PNG"), ("RGB", "JPEG"), ("CMYK", "JPEG"),
                                         ("RGB", "WEBP"), ("RGB", "BMP"), ("P", "GIF"), ("RGB", "TIFF")])
def test_modes_and_formats_become_rgb(mode, format):
    pixels = np.random.default_rng(0).integers(0, 256, size=(7, 11, 3), dtype=np.uint8)
    image = decode_image(encoded(Image.fromarray(pixels).convert(mode), format), max_pixels=100)
    assert image.mode == "RGB" and image.size == (11, 7)


def test_rgb_png_pixels_are_untouched():
    pixels = np.random.default_rng(1).integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(decode_image(encoded(Image.fromarray(pixels), "PNG"), 30)), pixels)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    image = decode_image(encoded(Image.fromarray(values), "PNG"), 100)
    assert np.asarray(image)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_limits_and_bad_data():
    with pytest.raises(ServiceError) as error:
        decode_image(encoded(Image.new("RGB", (11, 10)), "PNG"), max_pixels=109)
    assert error.value.type == "image_too_large" and "11x10 = 110 pixels" in error.value.message
    with pytest.raises(ServiceError) as error:
        noise = np.random.default_rng(2).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        decode_image(encoded(Image.fromarray(noise), "PNG")[:500], max_pixels=10_000)
    assert error.value.type == "invalid_image" and error.value.status_code == 400
    with pytest.raises(ServiceError) as error:
        decode_image(b"GIF89a but not really", max_pixels=100)
    assert error.value.type == "unsupported_media_type"  # a GIF signature without a GIF


def oriented_jpeg(width: int, height: int, orientation: int, format: str = "JPEG") -> tuple[bytes, np.ndarray]:
    """A JPEG (or multi-picture JPEG) whose stored grid is ``width`` x ``height``, with a white top-left corner."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[: height // 4, : width // 4] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"exif": exif.tobytes(), "quality": 95}
    if format == "MPO":
        options.update(save_all=True, append_images=[Image.new("RGB", (width, height), (0, 0, 255))])
    return encoded(Image.fromarray(pixels), format, **options), pixels


@pytest.mark.parametrize("format", ["JPEG", "MPO"])
def test_exif_orientation_is_applied(format):
    data, _ = oriented_jpeg(36, 64, orientation=6, format=format)  # a person sees it 64 wide, 36 high
    upright = decode_image(data, max_pixels=10_000)
    assert upright.size == (64, 36) and upright.mode == "RGB"
    # orientation 6: turned 90 degrees clockwise, so the stored top-left corner is now top-right
    assert np.asarray(upright)[2, -3].min() > 200 and np.asarray(upright)[2, 2].max() < 50
    stored = decode_image(data, max_pixels=10_000, exif_orientation=False)
    assert stored.size == (36, 64)


def test_mpo_first_picture_and_progressive_jpeg():
    data, pixels = oriented_jpeg(24, 16, orientation=1, format="MPO")
    assert Image.open(io.BytesIO(data)).format == "MPO"
    image = decode_image(data, max_pixels=1000)
    assert image.size == (24, 16)
    assert np.abs(np.asarray(image).astype(int) - pixels).mean() < 10  # the first picture, not the blue second
    progressive = encoded(Image.fromarray(pixels), "JPEG", progressive=True)
    assert decode_image(progressive, max_pixels=1000).size == (24, 16)


def test_a_corrupt_exif_block_is_ignored():
    exif = Image.Exif()
    exif[0x0112] = 99  # not an orientation
    data = encoded(Image.new("RGB", (12, 8)), "JPEG", exif=exif.tobytes())
    assert decode_image(data, max_pixels=1000).size == (12, 8)


def png_header_only(width: int, height: int, bit_depth: int = 1, colour_type: int = 0) -> bytes:
    """A PNG that declares ``width`` x ``height`` (1-bit grey by default) with one empty IDAT: what a bomb looks
    like to a header reader, in 60 bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("max_pixels", [40_000_000, 1_000_000_000])
def test_pillows_bomb_refusal_quotes_the_services_limit(max_pixels):
    # 900 million pixels: over twice Pillow's MAX_IMAGE_PIXELS, so Pillow refuses it inside Image.open, before the
    # service's own header check runs. The answer still speaks of the service's limit.
    with pytest.raises(ServiceError) as error:
        decode_image(png_header_only(30_000, 30_000), max_pixels=max_pixels)
    assert error.value.type == "image_too_large" and error.value.status_code == 413
    message = error.value.message
    assert "900,000,000 pixels" in message and f"{max_pixels:,}" in message, message
    if max_pixels < 900_000_000:
        assert message == f"the image is 900,000,000 pixels; the limit is {max_pixels:,}"
    else:  # an operator limit above what Pillow decodes: said so, with both numbers
        assert "more than the image decoder accepts" in message
