"""Geometry policies and the letterbox: how an image of any size becomes the network input (docs/design.md,
"Geometry policy").

The policy names (``GEOMETRIES``) and the ``Placement`` protocol every policy's per-image record follows (image
size, resized size, input size). The letterbox: the image is resized (bilinear, aspect kept) so that its longer
side is ``S``, placed at the top-left of an ``S x S`` canvas and padded bottom/right with zeros *after*
normalisation (i.e. with the mean colour). The way back from the network's grid to the image's pixels, for any
placement, is ``model.resample``; the native policy is ``model.native``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image

# The geometry policies (docs/design.md): "letterbox" (every image in an S x S square) and "native" (each image
# at its own size, resized only past a cap; the official protocol, model.native).
GEOMETRIES = ("letterbox", "native")


def check_geometry(name: str) -> str:
    """``name`` if it is one of ``GEOMETRIES``, else ``ValueError``."""
    if name not in GEOMETRIES:
        raise ValueError(f"unknown geometry {name!r}; use one of {', '.join(GEOMETRIES)}")
    return name


class Placement(Protocol):
    """Where an ``(H, W)`` image sits in the network input: the resized ``(rh, rw)`` image occupies the top-left
    of an ``input_hw`` input (the rest is padding)."""

    @property
    def image_hw(self) -> tuple[int, int]: ...

    @property
    def resized_hw(self) -> tuple[int, int]: ...

    @property
    def input_hw(self) -> tuple[int, int]: ...




def check_image_and_bound(image_hw: tuple[int, int], bound: int, bound_name: str) -> None:
    """A positive image size ``(H, W)`` and a positive ``bound`` (the letterbox side ``S`` or the native cap, called
    ``bound_name`` in the message), else ``ValueError``: what every geometry checks before placing an image."""
    h, w = image_hw
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got (H, W) = {tuple(image_hw)}")
    if bound < 1:
        raise ValueError(f"{bound_name} must be positive, got {bound}")


def check_placement_sizes(image_hw: tuple[int, int], resized_hw: tuple[int, int], bound: int, bound_name: str,
                          misfit: str) -> None:
    """The checks every placement makes on construction: ``check_image_and_bound``, and a resized size
    ``(rh, rw)`` within the bound (else ``ValueError``: "resized size ... <misfit>")."""
    check_image_and_bound(image_hw, bound, bound_name)
    rh, rw = resized_hw
    if not (1 <= rh <= bound and 1 <= rw <= bound):
        raise ValueError(f"resized size {resized_hw} {misfit}")


@dataclass(frozen=True)
class Letterbox:
    """Where an ``(H, W)`` image sits inside the square ``S x S`` network input.

    ``image_hw`` is the original size in pixels, ``input_size`` is ``S``, ``resized_hw`` = ``(rh, rw)`` is the
    size of the resized image, which occupies rows ``[0, rh)`` and columns ``[0, rw)`` of the input.
    """

    image_hw: tuple[int, int]
    input_size: int
    resized_hw: tuple[int, int]

    def __post_init__(self) -> None:
        check_placement_sizes(self.image_hw, self.resized_hw, self.input_size, "input size",
                              f"does not fit in a {self.input_size}^2 input")

    @property
    def valid_hw(self) -> tuple[int, int]:
        """``(rh, rw)``: the unpadded region of the network input, in input pixels."""
        return self.resized_hw

    @property
    def input_hw(self) -> tuple[int, int]:
        """``(S, S)``: the network input's size in pixels."""
        return (self.input_size, self.input_size)

    @property
    def scale(self) -> float:
        """Input pixels per original pixel (``S / max(H, W)``)."""
        return self.input_size / max(self.image_hw)

    @property
    def is_identity(self) -> bool:
        """True when the image is exactly the network input (square, ``S`` pixels, no resize, no padding)."""
        return self.image_hw == self.resized_hw == (self.input_size, self.input_size)


def letterbox_for(image_hw: Sequence[int], input_size: int) -> Letterbox:
    """The letterbox of an ``(H, W)`` image in an ``S x S`` input: ``resized = round((H, W) * S / max(H, W))``.

    Each resized side is at least 1 pixel (Python's ``round``: halves go to the even integer).
    """
    if len(image_hw) != 2:
        raise ValueError(f"image_hw must be (H, W), got {tuple(image_hw)}")
    h, w = (int(v) for v in image_hw)
    s = int(input_size)
    check_image_and_bound((h, w), s, "input size")
    longest = max(h, w)
    # H * S / max(H, W) rather than H * (S / max): the longer side then comes out as exactly S.
    resized = (max(1, round(h * s / longest)), max(1, round(w * s / longest)))
    return Letterbox(image_hw=(h, w), input_size=s, resized_hw=resized)


def as_rgb_pil(image: "Image.Image | np.ndarray") -> "Image.Image":
    """A PIL image (converted to RGB) or an ``(H, W, 3)`` uint8 RGB array -> an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"an image array must be (H, W, 3) uint8, got shape {image.shape} dtype {image.dtype}")
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f"image is empty: shape {image.shape}")
        return Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    raise ValueError(f"expected a PIL image or an (H, W, 3) uint8 array, got {type(image).__name__}")


def preprocess_image(
    image: "Image.Image | np.ndarray",
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[torch.Tensor, Letterbox]:
    """Letterbox one image into a normalised network input.

    Args:
        image: a PIL image (any mode; converted to RGB) or an ``(H, W, 3)`` uint8 RGB array.
        input_size: ``S``, the square input side in pixels.
        mean, std: per-channel RGB normalisation on the ``[0, 1]`` scale.

    Returns:
        ``(x, letterbox)``: ``x`` is ``(3, S, S)`` float32, the PIL-bilinear resized image normalised with
        ``(v - mean) / std`` in the top-left ``rh x rw`` region and 0 (the mean colour) elsewhere.
    """
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each, got {len(mean)} and {len(std)}")
    if any(float(s) <= 0.0 for s in std):
        raise ValueError(f"std must be positive, got {tuple(std)}")
    pil = as_rgb_pil(image)
    box = letterbox_for((pil.height, pil.width), input_size)
    rh, rw = box.resized_hw
    x = torch.zeros(3, box.input_size, box.input_size, dtype=torch.float32)
    normalise_pixels(pil, box.resized_hw, mean, std, out=x[:, :rh, :rw])
    return x, box


def normalise_pixels(pil: "Image.Image", size_hw: tuple[int, int], mean: Sequence[float],
                     std: Sequence[float], out: torch.Tensor | None = None) -> torch.Tensor:
    """An RGB PIL image resized (PIL bilinear, only if its size differs) to ``size_hw`` = ``(h, w)``, as a
    ``(3, h, w)`` float32 tensor ``(v / 255 - mean) / std``, written into ``out`` (a (3, h, w) float32 tensor or
    view) when given.

    The arithmetic runs in place in the destination, one operation per pass (float(v), / 255, - mean, / std,
    each rounded to float32 as before): the same values as the out-of-place expression at about a third of its
    CPU time (benchmarks/host_bench.py).
    """
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each, got {len(mean)} and {len(std)}")
    if any(float(s) <= 0.0 for s in std):
        raise ValueError(f"std must be positive, got {tuple(std)}")
    h, w = size_hw
    if (pil.height, pil.width) != (h, w):
        pil = pil.resize((w, h), resample=Image.Resampling.BILINEAR)
    if out is None:
        out = torch.empty(3, h, w, dtype=torch.float32)
    if tuple(out.shape) != (3, h, w) or out.dtype != torch.float32:
        raise ValueError(f"out must be a (3, {h}, {w}) float32 tensor, got {tuple(out.shape)} {out.dtype}")
    out.copy_(torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1))
    mean_t = torch.tensor([float(v) for v in mean], dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor([float(v) for v in std], dtype=torch.float32).view(3, 1, 1)
    return out.div_(255.0).sub_(mean_t).div_(std_t)


__all__ = ["GEOMETRIES", "check_geometry", "Placement", "check_image_and_bound", "check_placement_sizes", "Letterbox",
           "letterbox_for", "as_rgb_pil", "preprocess_image", "normalise_pixels"]
