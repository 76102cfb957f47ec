"""COCO polygons (an instance's ``segmentation`` when the request asked ``mask_format="polygon"``) to a numpy
mask, without pycocotools or OpenCV.

The rasterisation is pycocotools' own (``maskApi.c``, ``rleFrPoly``), ported to numpy so that a polygon answer
decodes here to the very pixels ``pycocotools.mask.frPyObjects`` gives: the ring is traced at 5x resolution, and
each pixel column toggles inside/outside where the trace crosses it. The mask is the union of the rings.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from zutis_client.errors import ZutisError

_SCALE = 5.0


def decode_polygons(polygons: Sequence[Sequence[float]], hw: tuple[int, int]) -> np.ndarray:
    """``[[x1, y1, x2, y2, ...], ...]`` (pixels; pixel edges at whole numbers) -> a bool mask of shape ``(h, w)``.

    Raises:
        ZutisError: ``invalid_answer``, a ring with fewer than three points or an odd number of coordinates.
    """
    h, w = int(hw[0]), int(hw[1])
    mask = np.zeros((h, w), dtype=bool)
    for ring in polygons:
        points = np.asarray(ring, dtype=np.float64)
        if points.ndim != 1 or points.size < 6 or points.size % 2:
            raise ZutisError("invalid_answer", f"a polygon ring needs an even number (>= 6) of coordinates, "
                                               f"got {points.size}")
        mask |= _ring_mask(points, h, w)
    return mask


def _ring_mask(points: np.ndarray, h: int, w: int) -> np.ndarray:
    x = np.trunc(_SCALE * points[0::2] + 0.5).astype(np.int64)  # C's (int) cast truncates
    y = np.trunc(_SCALE * points[1::2] + 0.5).astype(np.int64)
    x, y = np.append(x, x[0]), np.append(y, y[0])
    us, vs = [], []
    for j in range(len(x) - 1):  # every sub-pixel point along each edge
        xs, xe, ys, ye = int(x[j]), int(x[j + 1]), int(y[j]), int(y[j + 1])
        dx, dy = abs(xe - xs), abs(ys - ye)
        flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
        if flip:
            xs, xe, ys, ye = xe, xs, ye, ys
        if dx >= dy:
            s = (ye - ys) / dx if dx else 0.0
            t = np.arange(dx + 1)
            t = dx - t if flip else t
            us.append(t + xs)
            vs.append(np.trunc(ys + s * t + 0.5).astype(np.int64))
        else:
            s = (xe - xs) / dy
            t = np.arange(dy + 1)
            t = dy - t if flip else t
            vs.append(t + ys)
            us.append(np.trunc(xs + s * t + 0.5).astype(np.int64))
    u, v = np.concatenate(us), np.concatenate(vs)
    # where the trace moves from one sub-pixel column to the next: a crossing of a pixel column's sample line
    moved = np.nonzero(u[1:] != u[:-1])[0] + 1
    uj, uk, vj, vk = u[moved], u[moved - 1], v[moved], v[moved - 1]
    xd = (np.where(uj < uk, uj, uj - 1) + 0.5) / _SCALE - 0.5
    keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= w - 1)
    yd = (np.where(vj < vk, vj, vk)[keep] + 0.5) / _SCALE - 0.5
    yd = np.ceil(np.clip(yd, 0, h))
    toggles = np.zeros(h * w + 1, dtype=np.int64)
    np.add.at(toggles, xd[keep].astype(np.int64) * h + yd.astype(np.int64), 1)
    column_major = (np.cumsum(toggles)[: h * w] % 2).astype(bool)
    return column_major.reshape(w, h).T


__all__ = ["decode_polygons"]
