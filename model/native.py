"""Native geometry: each image runs at its own size, aspect ratio kept, as the official inference protocol does
(reference §3.1, §3.6).

An ``(H, W)`` image enters the network as it is, unless its longer side exceeds a cap (default: the checkpoint's
input size); then it is resized (PIL bilinear) so that its longer side is the cap and its shorter side is
``int(short / long * cap)`` (truncated, as the official ImageNet-S loader computes it). Sizes that are not
multiples of the patch size are not padded: the patch embedding drops the trailing pixels, and the ``h' x w'``
output grid is stretched over the whole original ``(H, W)`` image (reference §7.1.3), which is what
``model.resample`` does for a placement whose input is the resized image itself.

Batches of native images are ragged: ``ZUTIS.forward_ragged`` takes one tensor per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from model.geometry import as_rgb_pil, check_image_and_bound, check_placement_sizes, normalise_pixels

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class NativeSize:
    """An ``(H, W)`` image at its own size: ``resized_hw`` = ``(rh, rw)`` is ``image_hw`` unless the longer side
    exceeded ``cap``. The network input is exactly the resized image (no padding)."""

    image_hw: tuple[int, int]
    cap: int
    resized_hw: tuple[int, int]

    def __post_init__(self) -> None:
        check_placement_sizes(self.image_hw, self.resized_hw, self.cap, "the size cap", f"exceeds the cap {self.cap}")

    @property
    def input_hw(self) -> tuple[int, int]:
        """The network input's size: the resized image itself."""
        return self.resized_hw

    @property
    def valid_hw(self) -> tuple[int, int]:
        """``(rh, rw)``: all of the input is image."""
        return self.resized_hw

    @property
    def is_identity(self) -> bool:
        """True when the image enters the network unresized."""
        return self.image_hw == self.resized_hw


def native_size_for(image_hw: Sequence[int], cap: int) -> NativeSize:
    """The native size of an ``(H, W)`` image under a longer-side ``cap`` (pixels).

    Unchanged when ``max(H, W) <= cap``; otherwise the longer side becomes ``cap`` and the shorter
    ``max(1, int(short / long * cap))``.
    """
    if len(image_hw) != 2:
        raise ValueError(f"image_hw must be (H, W), got {tuple(image_hw)}")
    h, w = (int(v) for v in image_hw)
    cap = int(cap)
    check_image_and_bound((h, w), cap, "the size cap")
    if max(h, w) <= cap:
        return NativeSize((h, w), cap, (h, w))
    if w > h:
        resized = (max(1, int(float(h) / w * cap)), cap)
    else:
        resized = (cap, max(1, int(float(w) / h * cap)))
    return NativeSize((h, w), cap, resized)


def preprocess_native(
    image: "Image.Image | np.ndarray",
    cap: int,
    mean: Sequence[float],
    std: Sequence[float],
    min_side: int = 1,
) -> tuple[torch.Tensor, NativeSize]:
    """One image at its native size as a normalised network input.

    Args:
        image: a PIL image (any mode; converted to RGB) or an ``(H, W, 3)`` uint8 RGB array.
        cap: the longest side, in pixels, that enters the network unresized.
        mean, std: per-channel RGB normalisation on the ``[0, 1]`` scale.
        min_side: the smallest side the network accepts (its patch size): smaller (resized) images are refused.

    Returns:
        ``(x, size)``: ``x`` is ``(3, rh, rw)`` float32, ``(v - mean) / std`` of the (resized) image.
    """
    pil = as_rgb_pil(image)
    size = native_size_for((pil.height, pil.width), cap)
    if min(size.resized_hw) < min_side:
        raise ValueError(f"the image is {size.image_hw[1]}x{size.image_hw[0]} pixels (resized to "
                         f"{size.resized_hw[1]}x{size.resized_hw[0]}); native geometry needs at least "
                         f"{min_side} pixels on each side (one patch)")
    return normalise_pixels(pil, size.resized_hw, mean, std), size


def padded_fraction(lengths: Sequence[int], padded_length: int | None = None) -> float:
    """The fraction of a ragged batch's token slots that are padding: ``1 - sum(n) / (B * N)``.

    ``lengths``: tokens per image; ``padded_length``: the common length ``N`` (default ``max(lengths)``).
    """
    if not lengths:
        return 0.0
    n = max(lengths) if padded_length is None else int(padded_length)
    if n < max(lengths):
        raise ValueError(f"padded length {n} is shorter than the longest sequence {max(lengths)}")
    return 1.0 - sum(lengths) / (len(lengths) * n)


__all__ = ["NativeSize", "native_size_for", "preprocess_native", "padded_fraction"]
