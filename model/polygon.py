"""Binary masks as COCO polygons, and back (OpenCV traces the outlines, pycocotools rasterises them).

COCO's pixel convention: pixel ``(row i, column j)`` covers the square ``[j, j + 1] x [i, i + 1]`` of the image
plane, so a polygon of the pixel *edges* (corners at whole numbers) is what ``pycocotools.mask.frPyObjects``
turns back into exactly those pixels. ``cv2.findContours`` returns the *centres* of the boundary pixels (their
indices): a polygon through them loses half a pixel all round (IoU about 0.87 on 10-pixel blobs). So the mask is
traced at twice its resolution, where each boundary pixel's outer half is its own sub-pixel, and the sub-pixel
index ``u`` maps to the pixel edge ``(u + 1) // 2`` (the left or top edge for an even ``u``, the right or bottom
edge for an odd one): the traced outline is then the pixels' own outline, exact before simplification.

One ring per connected part (8-connectivity). COCO's polygon format has no hole rings (pycocotools unites an
instance's rings), so a part with holes is one ring that runs from its outline to each hole, round the hole the
other way, and back along the same zero-width cut (a "keyhole"): pycocotools, and any even-odd or nonzero fill,
rasterise the hole as a hole. A tool that needs simple polygons sees a ring that touches itself along the cut; a
hole that simplifies to fewer than three points is filled. Rings are simplified with Douglas-Peucker
(``cv2.approxPolyDP``) to within ``tolerance`` pixels of the traced outline; 0 keeps every corner. A part that the
tolerance would cost more than 5 % IoU (small or thin parts: a 1-pixel tolerance on a thin ring) is simplified
less, so that every part keeps IoU >= ``MIN_PART_IOU`` with its own pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Polygons = list[list[float]]  # COCO: one flat [x1, y1, x2, y2, ...] list per ring, in pixels
MIN_PART_IOU = 0.95  # the fidelity floor of a simplified part (IoU with its traced outline)
MIN_TOLERANCE = 0.25  # below this a part that misses the floor is sent unsimplified


def mask_to_polygons(mask: np.ndarray, tolerance: float = 1.0) -> Polygons:
    """The outline of a binary mask as COCO polygons.

    Args:
        mask: ``(H, W)`` bool (or 0/1 integers).
        tolerance: most distance, in pixels, between a simplified ring and the traced outline (>= 0).

    Returns:
        one ring per 8-connected part, each a flat ``[x1, y1, x2, y2, ...]`` list of at least three points in
        image pixels (x right, y down, pixel edges at whole numbers); a part's holes are reached through
        zero-width cuts of its ring (see the module docstring); ``[]`` for an empty mask. Every coordinate is a
        whole number (a pixel corner; simplification keeps a subset of the traced corners).
    """
    import cv2  # deferred: only polygon answers need OpenCV

    if tolerance < 0 or not np.isfinite(tolerance):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return []
    # Traced in the mask's box plus a 1-pixel margin of background (the same neighbourhood as in the whole image),
    # then moved back: the cost follows the object's size, not the image's (an object in a 480 x 640 mask: 30x).
    top, left = max(int(rows[0]) - 1, 0), max(int(cols[0]) - 1, 0)
    box = mask[top:int(rows[-1]) + 2, left:int(cols[-1]) + 2]
    offset = np.array([left, top], dtype=np.float32)  # (x, y) in pixels
    doubled = np.repeat(np.repeat(box.astype(np.uint8), 2, axis=0), 2, axis=1)
    # RETR_CCOMP: outer boundaries at the top level, each with its holes as children (a part inside a hole is
    # a top-level boundary again, so it gets its own ring).
    contours, hierarchy = cv2.findContours(doubled, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    links = hierarchy.reshape(-1, 4)  # next, previous, first child, parent
    rings: Polygons = []
    for index in range(len(contours)):
        if links[index, 3] != -1:
            continue  # a hole: joined to its part's ring
        exact = _part_ring(contours, links, index, 0.0)
        if exact is None:
            continue
        ring, step = (exact if tolerance == 0 else _part_ring(contours, links, index, tolerance)), tolerance
        # The fidelity floor: where the tolerance would cost a (small or thin) part more than 1 - MIN_PART_IOU
        # of its pixels, that part is simplified less (halving the tolerance; below MIN_TOLERANCE, not at all).
        while ring is not exact and (ring is None or _ring_iou(ring, exact) < MIN_PART_IOU):
            step /= 2
            ring = exact if step < MIN_TOLERANCE else _part_ring(contours, links, index, step)
        rings.append([float(v) for v in (ring + offset).ravel()])
    return rings


def _part_ring(contours: Sequence[np.ndarray], links: np.ndarray, index: int,
               tolerance: float) -> np.ndarray | None:
    """The ring of top-level contour ``index`` with its holes joined in, simplified; None if it vanishes."""
    ring = _ring_points(contours[index], tolerance)
    if ring is None:
        return None
    child = links[index, 2]
    while child != -1:
        hole = _ring_points(contours[child], tolerance)
        if hole is not None:  # a hole simplified away stays filled
            ring = _join_hole(ring, hole)
        child = links[child, 0]
    return ring


def _ring_iou(ring: np.ndarray, exact: np.ndarray) -> float:
    """IoU of two rings rasterised by pycocotools over the exact ring's box."""
    from pycocotools import mask as mask_utils

    origin = exact.min(axis=0)
    h, w = (int(v) + 1 for v in (exact.max(axis=0) - origin)[::-1])
    a, b = (mask_utils.decode(mask_utils.frPyObjects([(r - origin).ravel().tolist()], h, w))[:, :, 0].astype(bool)
            for r in (ring, exact))
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def _ring_points(contour: np.ndarray, tolerance: float) -> np.ndarray | None:
    """A traced contour of the doubled mask as ``(N, 2)`` float32 pixel corners, simplified; None under 3."""
    import cv2

    points = ((contour.reshape(-1, 2) + 1) // 2).astype(np.float32)  # sub-pixel index -> pixel edge
    points = _drop_repeats(points)
    if tolerance > 0 and len(points) > 3:
        simplified = cv2.approxPolyDP(points.reshape(-1, 1, 2), float(tolerance), True).reshape(-1, 2)
        if len(simplified) >= 3:  # a thin part may simplify to a line: keep its traced outline then
            points = simplified
    return points if len(points) >= 3 else None


def _join_hole(ring: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """``ring`` with ``hole`` spliced in through a zero-width cut between their closest vertices, the hole run the
    other way round (so that even-odd and nonzero fills both leave it empty)."""
    if _signed_area(ring) * _signed_area(hole) > 0:
        hole = hole[::-1]
    distances = ((ring[:, None, :] - hole[None, :, :]) ** 2).sum(axis=2)
    i, j = np.unravel_index(int(distances.argmin()), distances.shape)
    around = np.concatenate([hole[j:], hole[: j + 1]])  # from the cut round the hole and back to it
    return np.concatenate([ring[: i + 1], around, ring[i:]])


def _drop_repeats(points: np.ndarray) -> np.ndarray:
    """``(N, 2)`` ring points without consecutive duplicates (two sub-pixels can map to one pixel corner)."""
    if len(points) < 2:
        return points
    keep = np.any(points != np.roll(points, 1, axis=0), axis=1)
    keep[0] = True
    return points[keep]


def _signed_area(points: np.ndarray) -> float:
    x, y = points[:, 0].astype(np.float64), points[:, 1].astype(np.float64)
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def polygons_to_mask(polygons: Sequence[Sequence[float]], hw: tuple[int, int]) -> np.ndarray:
    """The ``(H, W)`` bool mask of COCO polygons (their union), rasterised by pycocotools; ``[]`` is empty."""
    from pycocotools import mask as mask_utils

    h, w = int(hw[0]), int(hw[1])
    rings = [[float(v) for v in ring] for ring in polygons]
    for ring in rings:
        if len(ring) < 6 or len(ring) % 2:
            raise ValueError(f"a polygon ring needs an even number (>= 6) of coordinates, got {len(ring)}")
    if not rings:
        return np.zeros((h, w), dtype=bool)
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(rings, h, w))).astype(bool)


__all__ = ["Polygons", "mask_to_polygons", "polygons_to_mask"]
