"""Letterbox geometry: how an image of any size becomes the ``S x S`` network input, and how the network's
``h' x w'`` output grid maps back onto the original ``(H, W)`` pixels (docs/design.md, "Geometry policy").

The image is resized (bilinear, aspect kept) so that its longer side is ``S``, placed at the top-left of an
``S x S`` canvas and padded bottom/right with zeros *after* normalisation (i.e. with the mean colour). Outputs
come back in one bilinear sampling from the grid straight to ``(H, W)``; nothing here allocates an ``S x S``
intermediate.

The resampling functions take any ``Placement``: the letterbox here, or the native geometry of
``model.native`` (each image at its own size, the official protocol), whose input is the resized image itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
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


# Bound on the elements of the float blocks interpolated at once by resample_argmax_to_image (~16 MiB).
_CHUNK_ELEMENTS = 2**22


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
        h, w = self.image_hw
        rh, rw = self.resized_hw
        if h < 1 or w < 1:
            raise ValueError(f"image size must be positive, got (H, W) = {self.image_hw}")
        if self.input_size < 1:
            raise ValueError(f"input size must be positive, got {self.input_size}")
        if not (1 <= rh <= self.input_size and 1 <= rw <= self.input_size):
            raise ValueError(f"resized size {self.resized_hw} does not fit in a {self.input_size}^2 input")

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
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got (H, W) = ({h}, {w})")
    if s < 1:
        raise ValueError(f"input size must be positive, got {input_size}")
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


def _sampling_grid(
    letterbox: Placement, rows: tuple[int, int] | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The ``(1, rows, W, 2)`` grid_sample grid (x, y in [-1, 1], align_corners=False) for output rows.

    Output pixel ``y`` samples grid row ``g = (y + 0.5) * rh / (H * S) * h' - 0.5`` (``S`` the input's height;
    likewise for columns with its width); in grid_sample's normalised coordinates (``g = ((n + 1) * h' - 1) / 2``)
    that is ``n = 2 * (y + 0.5) * rh / (H * S) - 1``, independent of ``h'``. Coordinates are computed in float64
    and then cast.
    """
    h, w = letterbox.image_hw
    rh, rw = letterbox.resized_hw
    sh, sw = letterbox.input_hw
    r0, r1 = (0, h) if rows is None else rows
    ys = (torch.arange(r0, r1, dtype=torch.float64) + 0.5) * (2.0 * rh / (h * sh)) - 1.0
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) * (2.0 * rw / (w * sw)) - 1.0
    grid = torch.empty(1, r1 - r0, w, 2, dtype=torch.float64)
    grid[..., 0] = xs.view(1, 1, w)
    grid[..., 1] = ys.view(1, -1, 1)
    return grid.to(device=device, dtype=dtype)


def resample_to_image(
    maps: torch.Tensor, letterbox: Placement, rows: tuple[int, int] | None = None
) -> torch.Tensor:
    """Bilinearly resample maps on the network's output grid to the original image's pixels, in one sampling.

    Exactly "stretch the ``h' x w'`` grid over the ``S x S`` input, crop the valid ``rh x rw`` region, resize to
    ``(H, W)``" composed into a single ``grid_sample`` (bilinear, border clamp, align_corners=False). Grid values
    just outside the valid region (padding) contribute to the last valid rows/columns, as they would in the
    two-step version.

    Args:
        maps: ``(N, h', w')`` or ``(N, C, h', w')`` floating tensor on any device.
        letterbox: the image's letterbox.
        rows: optional ``(start, stop)`` range of output rows to produce (for chunking); default all ``H``.

    Returns:
        ``(N, H, W)`` or ``(N, C, H, W)`` (``H`` replaced by ``stop - start`` when ``rows`` is given), same dtype
        and device as ``maps``.
    """
    if maps.ndim not in (3, 4):
        raise ValueError(f"maps must be (N, h', w') or (N, C, h', w'), got shape {tuple(maps.shape)}")
    if not maps.is_floating_point():
        raise ValueError(f"maps must be a floating tensor, got {maps.dtype}")
    h, w = letterbox.image_hw
    if rows is not None and not (0 <= rows[0] <= rows[1] <= h):
        raise ValueError(f"rows {rows} outside [0, {h}]")
    lead = maps.shape[:-2]
    gh, gw = maps.shape[-2:]
    n_out = h if rows is None else rows[1] - rows[0]
    if maps.numel() == 0 or n_out == 0:
        return maps.new_zeros(*lead, n_out, w)
    # All maps become channels of one batch item so that a single (1, rows, W, 2) grid serves them all.
    grid = _sampling_grid(letterbox, rows, maps.dtype, maps.device)
    flat = maps.reshape(1, -1, gh, gw)
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(*lead, n_out, w)


def _axis_sampling(
    out_size: int, valid: int, grid_size: int, input_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output index along one axis: the grid index before it and the weight of the one after.

    Output index ``o`` samples grid coordinate ``(o + 0.5) * valid / (out_size * S) * grid_size - 0.5``, clamped
    to ``[0, grid_size - 1]`` (grid_sample's border padding). Returns int64 indices and float64 weights.
    """
    g = (torch.arange(out_size, dtype=torch.float64) + 0.5) * (valid * grid_size / (out_size * input_size)) - 0.5
    g = g.clamp_(0.0, grid_size - 1.0)
    i0 = g.floor().to(torch.int64)
    return i0.to(device), (g - i0).to(device)


def _runs(index: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a non-decreasing index into ``range(size)``: where each value's run starts, and its length."""
    values = torch.arange(size, device=index.device)
    start = torch.searchsorted(index, values)
    return start, torch.searchsorted(index, values, right=True) - start


@dataclass(frozen=True)
class _Cells:
    """How output pixels fall into grid cells: cell ``(i, j)`` lies between grid rows ``i, i + 1`` and columns
    ``j, j + 1`` (the last ones replicated) and holds output rows ``[row_start[i], row_start[i] + row_count[i])``
    and the matching columns. Pixels are bilinear in their cell's four corners with weights ``wy``, ``wx``."""

    grid_hw: tuple[int, int]
    image_hw: tuple[int, int]
    y0: torch.Tensor  # (H,) int64 cell row of each output row
    wy: torch.Tensor  # (H,) float64
    x0: torch.Tensor  # (W,) int64
    wx: torch.Tensor  # (W,) float64
    row_start: torch.Tensor  # (h',) int64
    row_count: torch.Tensor  # (h',) int64
    col_start: torch.Tensor  # (w',) int64
    col_count: torch.Tensor  # (w',) int64

    @property
    def sampled(self) -> torch.Tensor:
        """``(h', w')`` bool: cells that hold at least one output pixel."""
        return (self.row_count > 0)[:, None] & (self.col_count > 0)[None, :]

    def expand(self, values: torch.Tensor) -> torch.Tensor:
        """``(N, h', w')`` per-cell values -> ``(N, H, W)``, each pixel taking its cell's value."""
        n, gh, gw = values.shape
        w = self.image_hw[1]
        # Columns with a gather (fast on the last dim), then rows, which copies whole contiguous rows.
        cols = torch.gather(values.reshape(n * gh, gw), 1, self.x0.expand(n * gh, w)).view(n, gh, w)
        return cols.index_select(1, self.y0)

    def pixels(self, i: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Output rows ``(M, R)`` and columns ``(M, C)`` of cells ``(i, j)``, padded by repeating the last one."""
        device = i.device
        rows = self.row_start[i, None] + torch.minimum(
            torch.arange(int(self.row_count.max()), device=device)[None, :], self.row_count[i, None] - 1)
        cols = self.col_start[j, None] + torch.minimum(
            torch.arange(int(self.col_count.max()), device=device)[None, :], self.col_count[j, None] - 1)
        return rows, cols


def _cells(letterbox: Placement, grid_hw: tuple[int, int], device: torch.device) -> _Cells:
    gh, gw = grid_hw
    sh, sw = letterbox.input_hw
    y0, wy = _axis_sampling(letterbox.image_hw[0], letterbox.resized_hw[0], gh, sh, device)
    x0, wx = _axis_sampling(letterbox.image_hw[1], letterbox.resized_hw[1], gw, sw, device)
    row_start, row_count = _runs(y0, gh)
    col_start, col_count = _runs(x0, gw)
    return _Cells((gh, gw), letterbox.image_hw, y0, wy, x0, wx, row_start, row_count, col_start, col_count)


def _shifted(maps: torch.Tensor, dim: int) -> torch.Tensor:
    """``maps`` shifted by one towards lower indices along ``dim``, the last slice replicated."""
    return torch.cat([maps.narrow(dim, 1, maps.shape[dim] - 1), maps.narrow(dim, maps.shape[dim] - 1, 1)], dim)


def resample_masks_to_image(probs: torch.Tensor, letterbox: Placement, threshold: float) -> torch.Tensor:
    """``resample_to_image(probs, letterbox) > threshold`` without interpolating most pixels.

    A bilinear value is a convex combination of the four grid values around it, so wherever all four exceed
    the threshold the pixel is in the mask, and wherever none does it is not; only the pixels of cells whose
    corners straddle the threshold (mask borders, a few percent of the image) are interpolated, in float64. The
    result can differ from thresholding the float32 ``grid_sample`` output only where the interpolated value is
    within rounding error (~1e-7) of the threshold.

    Args:
        probs: ``(N, h', w')`` floating maps (probabilities) on any device.
        letterbox: the image's letterbox.
        threshold: pixels with a resampled value strictly greater are ``True``.

    Returns:
        ``(N, H, W)`` bool on the maps' device.
    """
    if probs.ndim != 3 or not probs.is_floating_point():
        raise ValueError(f"probs must be an (N, h', w') floating tensor, got shape {tuple(probs.shape)} "
                         f"{probs.dtype}")
    n, gh, gw = probs.shape
    h, w = letterbox.image_hw
    if n == 0 or gh == 0 or gw == 0:
        return torch.zeros(n, h, w, dtype=torch.bool, device=probs.device)
    cells = _cells(letterbox, (gh, gw), probs.device)
    right = _shifted(probs, 2)
    row_max, row_min = torch.maximum(probs, right), torch.minimum(probs, right)
    cell_max = torch.maximum(row_max, _shifted(row_max, 1))
    cell_min = torch.minimum(row_min, _shifted(row_min, 1))
    all_in = cell_min > threshold
    out = cells.expand(all_in)  # (N, H, W); mixed cells are overwritten below

    k, i, j = torch.nonzero((cell_max > threshold) & ~all_in & cells.sampled, as_tuple=True)
    if k.numel():
        # Every pixel of a mixed cell, as an (M, R, C) block; short cells repeat their last row/column, which
        # writes the same value twice.
        rows, cols = cells.pixels(i, j)
        flat = probs.to(torch.float64).reshape(-1)
        upper, lower = k * (gh * gw) + i * gw, k * (gh * gw) + (i + 1).clamp(max=gh - 1) * gw
        j1 = (j + 1).clamp(max=gw - 1)
        ax, ay = cells.wx[cols], cells.wy[rows]  # (M, C), (M, R)
        top = torch.lerp(flat[upper + j][:, None], flat[upper + j1][:, None], ax)
        bottom = torch.lerp(flat[lower + j][:, None], flat[lower + j1][:, None], ax)
        inside = torch.lerp(top[:, None, :], bottom[:, None, :], ay[:, :, None]) > threshold  # (M, R, C)
        target = (k[:, None, None] * h + rows[:, :, None]) * w + cols[:, None, :]
        out.view(-1)[target.view(-1)] = inside.view(-1)
    return out


def resample_argmax_to_image(maps: torch.Tensor, letterbox: Placement) -> torch.Tensor:
    """``resample_to_image(maps, letterbox).argmax(0)`` without interpolating most pixels.

    Where the four grid values around a cell share their argmax ``c``, every convex combination of them has
    argmax ``c`` too (ties included, as argmax takes the lowest index), so only the pixels of cells whose corners
    disagree (class borders) are interpolated (float32, in bounded chunks of cells). The result can differ from
    the ``grid_sample`` one only where two interpolated values tie within rounding error.

    Args:
        maps: ``(C, h', w')`` floating per-class scores on any device.
        letterbox: the image's letterbox.

    Returns:
        ``(H, W)`` int64 class indices on the maps' device.
    """
    if maps.ndim != 3 or not maps.is_floating_point() or maps.shape[0] < 1:
        raise ValueError(f"maps must be a (C, h', w') floating tensor with C >= 1, got shape {tuple(maps.shape)} "
                         f"{maps.dtype}")
    c, gh, gw = maps.shape
    h, w = letterbox.image_hw
    cells = _cells(letterbox, (gh, gw), maps.device)
    corner = maps.argmax(dim=0)  # (h', w')
    right = _shifted(corner, 1)
    agree = (corner == right) & (corner == _shifted(corner, 0)) & (corner == _shifted(right, 0))
    out = cells.expand(corner[None])[0]  # (H, W); cells whose corners disagree are overwritten below
    i, j = torch.nonzero(~agree & cells.sampled, as_tuple=True)
    if i.numel():
        hwc = maps.permute(1, 2, 0).float()  # (h', w', C): a cell corner's scores are one contiguous row
        i1, j1 = (i + 1).clamp(max=gh - 1), (j + 1).clamp(max=gw - 1)
        rows, cols = cells.pixels(i, j)
        step = max(1, _CHUNK_ELEMENTS // (rows.shape[1] * cols.shape[1] * c))
        for m in range(0, i.numel(), step):
            part = slice(m, m + step)
            ax = cells.wx[cols[part]].float()[:, :, None]  # (M, C', 1)
            ay = cells.wy[rows[part]].float()[:, :, None, None]  # (M, R, 1, 1)
            top = torch.lerp(hwc[i[part], j[part]][:, None], hwc[i[part], j1[part]][:, None], ax)  # (M, C', C)
            bottom = torch.lerp(hwc[i1[part], j[part]][:, None], hwc[i1[part], j1[part]][:, None], ax)
            labels = torch.lerp(top[:, None], bottom[:, None], ay).argmax(dim=-1)  # (M, R, C')
            target = rows[part][:, :, None] * w + cols[part][:, None, :]
            out.view(-1)[target.view(-1)] = labels.view(-1)
    return out


def valid_grid_hw(letterbox: Placement, grid_hw: Sequence[int]) -> tuple[int, int]:
    """``(vh, vw)``: how many rows/columns of an ``h' x w'`` output grid cover any part of the valid region.

    ``vh = ceil(rh / S * h')``, ``vw = ceil(rw / S * w')`` (exact integer arithmetic), clamped to
    ``[1, h']`` / ``[1, w']``. A grid cell spans ``S / h'`` input pixels, so these are the cells that overlap
    the unpadded ``rh x rw`` image (the last one possibly only partly).
    """
    gh, gw = (int(v) for v in grid_hw)
    if gh < 1 or gw < 1:
        raise ValueError(f"grid size must be positive, got {tuple(grid_hw)}")
    rh, rw = letterbox.resized_hw
    sh, sw = letterbox.input_hw
    vh = -(-rh * gh // sh)
    vw = -(-rw * gw // sw)
    return min(max(vh, 1), gh), min(max(vw, 1), gw)


__all__ = ["GEOMETRIES", "check_geometry", "Placement", "Letterbox", "letterbox_for", "preprocess_image",
           "normalise_pixels", "resample_to_image", "resample_masks_to_image",
           "resample_argmax_to_image", "valid_grid_hw"]
