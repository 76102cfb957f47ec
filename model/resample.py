"""From the network's ``h' x w'`` output grid back to the original ``(H, W)`` pixels, for any ``Placement``
(docs/design.md, "Geometry policy").

Outputs come back in one bilinear sampling from the grid straight to ``(H, W)``; nothing here allocates an
``S x S`` intermediate. A placement is the letterbox of ``model.geometry`` or the native geometry of
``model.native`` (each image at its own size, the official protocol), whose input is the resized image itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.geometry import Placement

# Bound on the elements of the float blocks interpolated at once by resample_argmax_to_image (~16 MiB).
_CHUNK_ELEMENTS = 2**22


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


__all__ = ["resample_to_image", "resample_masks_to_image", "resample_argmax_to_image", "valid_grid_hw"]
