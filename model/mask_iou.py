"""Areas and IoUs of binary masks: the one home of mask overlap arithmetic (NMS, pseudo-mask voting, checks).

Three IoU functions, whose arithmetic differs on purpose. Each caller's results depend on it bit for bit, so
none of them may be rewritten in terms of another:

- ``mask_iou_matrix(masks)``: ``I / (U + 1e-7)`` in float64; an empty mask has IoU 0 with every mask, itself
  included. Used by ``model.nms`` (post-processing).
- ``pairwise_iou(masks)``: ``I / U`` in float32; two empty masks have IoU 1. Used by the pseudo-mask vote
  (``model.training.pseudo_masks.clustering.vote``).
- ``mask_iou(a, b)``: one pair, ``I / U`` from numpy counts; two empty masks have IoU 1. Used to score one mask
  against a reference (tests, diagnostics).

Why each convention:

- NMS compares ``iou > iou_threshold``. ``mask_iou_matrix`` is the official reference's own expression,
  ``intersection / (union + 1e-7)`` in float64, with exact integer counts for any image size, so the vectorised
  NMS and the literal reference loop make the same decision for every pair, including pairs exactly at the
  threshold. The ``+ 1e-7`` makes an empty mask overlap nothing (IoU 0, itself included), and puts the diagonal
  of a non-empty mask of area ``a`` at ``a / (a + 1e-7)``, just below 1.
- The pseudo-mask vote picks the candidate with the largest summed IoU against all candidates. Its float32
  arithmetic is what produced every stored pseudo-mask (the stage's cache key does not hash code), so it stays
  as it is: a change of rounding could flip a near tie and change a mask. Its counts are exact for masks of up
  to ``2**24`` pixels (the stage votes at a working size of at most ``max_mask_side`` pixels a side, 512 by
  default). Two empty masks are equal, so they agree fully (IoU 1); the stage drops empty candidates before
  voting, so this only shows to direct callers.
- ``mask_iou`` scores one mask against a reference (tests, diagnostics): two empty masks agree, IoU 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Integer counts of up to 2**24 are exact in float32 whatever the summation order, so intersections are
# accumulated from float32 products over pixel chunks shorter than that.
_EXACT_F32_COUNT = 2**24
# Bound on the float32 copy of the masks made per chunk (elements): ~64 MiB.
_CHUNK_ELEMENTS = 2**24


def flatten_masks(masks: torch.Tensor) -> torch.Tensor:
    """Bool ``(N, H, W)`` or ``(N, P)`` masks as ``(N, P)`` (a view); ``ValueError`` on another dtype or rank."""
    if masks.dtype != torch.bool:
        raise ValueError(f"masks must be a bool tensor, got {masks.dtype}")
    if masks.ndim == 3:
        return masks.reshape(masks.shape[0], masks.shape[1] * masks.shape[2])
    if masks.ndim == 2:
        return masks
    raise ValueError(f"masks must be (N, H, W) or (N, P), got shape {tuple(masks.shape)}")


def mask_areas(masks: torch.Tensor) -> torch.Tensor:
    """Pixel count of each mask: ``(N, ...)`` bool -> ``(N,)`` int64, on the masks' device.

    Counts bytes in blocks of 255 with uint8 accumulation, then sums the block counts: on CPU this is tens of
    times faster than ``masks.sum()``, which converts every element to int64.
    """
    if masks.dtype != torch.bool or masks.ndim < 1:
        raise ValueError(f"masks must be an (N, ...) bool tensor, got shape {tuple(masks.shape)} {masks.dtype}")
    flat = masks.reshape(masks.shape[0], math.prod(masks.shape[1:]))
    n, p = flat.shape
    if n == 0 or p == 0:
        return torch.zeros(n, dtype=torch.int64, device=flat.device)
    flat = flat.view(torch.uint8)
    main = p - p % 255
    total = flat[:, :main].reshape(n, main // 255, 255).sum(dim=2, dtype=torch.uint8).sum(dim=1)
    if main < p:
        total = total + flat[:, main:].sum(dim=1)
    return total.to(torch.int64)


def mask_iou_matrix(masks: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of boolean masks as NMS needs it: ``I / (|a| + |b| - I + 1e-7)`` (empty masks: IoU 0).

    Intersections come from matrix products of the float32 masks over pixel chunks of at most ``2**24`` pixels
    (so each chunk's integer counts are exact in float32), accumulated in float64. The result is therefore exact
    for any image size, and the final division is the same float64 operation as the reference loop's numpy
    ``intersection / (union + 1e-7)``, so the two compare bit-identically against a threshold.

    Args:
        masks: ``(N, H, W)`` or ``(N, P)`` bool, on any device.

    Returns:
        ``(N, N)`` float64 IoU on the masks' device (diagonal ``a / (a + 1e-7)`` for a mask of area ``a``: just
        below 1 for non-empty masks, 0 for empty ones).
    """
    flat = flatten_masks(masks)
    n, p = flat.shape
    inter = torch.zeros(n, n, dtype=torch.float64, device=flat.device)
    if n == 0 or p == 0:
        return inter
    chunk = max(1, min(_EXACT_F32_COUNT, _CHUNK_ELEMENTS // n))
    for start in range(0, p, chunk):
        part = flat[:, start:start + chunk].to(torch.float32)
        inter += (part @ part.T).to(torch.float64)
    area = mask_areas(flat).to(torch.float64)
    union = area[:, None] + area[None, :] - inter
    return inter / (union + 1e-7)


def pairwise_iou(masks: torch.Tensor) -> torch.Tensor:
    """IoU between every pair of masks as the pseudo-mask vote needs it: ``I / U`` in float32.

    Args:
        masks: bool ``(M, H, W)``; counts are exact while ``H * W <= 2**24``.

    Returns:
        float32 ``(M, M)`` on the masks' device; two empty masks have IoU 1 (an empty and a non-empty one: 0).
    """
    flat = masks.flatten(1).float()
    inter = flat @ flat.T
    area = flat.sum(dim=1)
    union = area[:, None] + area[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(inter))


def mask_iou(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """IoU of two binary ``(H, W)`` masks (numpy or torch, any dtype; nonzero is foreground).

    Two empty masks have IoU 1.0 (they agree). Raises ``ValueError`` on different shapes.
    """
    a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a).astype(bool)
    b = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b).astype(bool)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"masks must be (H, W) of the same shape, got {a.shape} and {b.shape}")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


__all__ = ["flatten_masks", "mask_areas", "mask_iou_matrix", "pairwise_iou", "mask_iou"]
