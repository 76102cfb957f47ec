"""Class-wise hard mask NMS (reference §3.4), vectorised, plus the plain greedy loop it must agree with.

Semantics, per label: repeatedly take the highest-scoring remaining candidate (it is kept whatever its score),
then discard every other remaining candidate whose mask IoU with it is ``> iou_threshold`` or whose score is
``<= score_floor``. Masks of different labels never suppress each other.

Ties: the official code sorts with ``np.argsort`` (unstable), so among equal scores its choice is arbitrary.
Here equal scores are broken by index (lower index first) in both implementations.
"""

from __future__ import annotations

import numpy as np
import torch

# Integer counts of up to 2**24 are exact in float32 whatever the summation order, so intersections are
# accumulated from float32 products over pixel chunks shorter than that.
_EXACT_F32_COUNT = 2**24
# Bound on the float32 copy of the masks made per chunk (elements): ~64 MiB.
_CHUNK_ELEMENTS = 2**24


def _flatten_masks(masks: torch.Tensor) -> torch.Tensor:
    if masks.dtype != torch.bool:
        raise ValueError(f"masks must be a bool tensor, got {masks.dtype}")
    if masks.ndim == 3:
        return masks.reshape(masks.shape[0], -1)
    if masks.ndim == 2:
        return masks
    raise ValueError(f"masks must be (N, H, W) or (N, P), got shape {tuple(masks.shape)}")


def mask_iou_matrix(masks: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of boolean masks: ``I / (|a| + |b| - I + 1e-7)``.

    Intersections come from matrix products of the float32 masks over pixel chunks of at most ``2**24`` pixels
    (so each chunk's integer counts are exact in float32), accumulated in float64. The result is therefore exact
    for any image size, and the final division is the same float64 operation as the reference loop's numpy
    ``intersection / (union + 1e-7)``, so the two compare bit-identically against a threshold.

    Args:
        masks: ``(N, H, W)`` or ``(N, P)`` bool, on any device.

    Returns:
        ``(N, N)`` float64 IoU on the masks' device (diagonal 1 for non-empty masks, 0 for empty ones).
    """
    flat = _flatten_masks(masks)
    n, p = flat.shape
    inter = torch.zeros(n, n, dtype=torch.float64, device=flat.device)
    if n == 0 or p == 0:
        return inter
    chunk = max(1, min(_EXACT_F32_COUNT, _CHUNK_ELEMENTS // n))
    for start in range(0, p, chunk):
        part = flat[:, start:start + chunk].to(torch.float32)
        inter += (part @ part.T).to(torch.float64)
    area = flat.sum(dim=1, dtype=torch.int64).to(torch.float64)
    union = area[:, None] + area[None, :] - inter
    return inter / (union + 1e-7)


def _check_candidates(masks: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> int:
    n = masks.shape[0] if masks.ndim >= 1 else -1
    if scores.shape != (n,) or labels.shape != (n,):
        raise ValueError(f"need masks (N, ...), scores (N,) and labels (N,); got shapes {tuple(masks.shape)}, "
                         f"{tuple(scores.shape)}, {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if n and not bool(torch.isfinite(scores).all()):
        raise ValueError("scores must be finite")
    return n


def _descending_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices by descending score, equal scores in ascending index order."""
    return torch.sort(scores.to(torch.float64), descending=True, stable=True).indices


def mask_nms(
    masks: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    iou_threshold: float = 0.3,
    score_floor: float = 0.001,
) -> torch.Tensor:
    """Class-wise hard mask NMS with the semantics of reference §3.4 (see the module docstring).

    The IoU matrix is computed once (one chunked matmul); pairs with different labels are masked out; then one
    greedy pass over the candidates in score order updates an ``N``-long "alive" vector per kept candidate.

    Args:
        masks: ``(N, H, W)`` or ``(N, P)`` bool.
        scores: ``(N,)`` float, finite.
        labels: ``(N,)`` integer class ids.
        iou_threshold: a candidate is suppressed by a kept one of its label when their IoU is strictly greater.
        score_floor: candidates with ``score <= score_floor`` are dropped, except the best of each label.

    Returns:
        ``(K,)`` int64 indices into the inputs of the kept candidates, by descending score (ties by index),
        on the masks' device.
    """
    n = _check_candidates(masks, scores, labels)
    device = masks.device
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    order = _descending_order(scores)
    labels_sorted = labels[order]
    scores_sorted = scores[order].to(torch.float64)
    # The first candidate of each label (in score order) is selected whatever its score; every other one must
    # clear the floor. Dropping the low-score ones up front is equivalent: dropped candidates suppress nothing.
    first_of_label = torch.ones(n, dtype=torch.bool, device=device)
    if n > 1:
        by_label = torch.sort(labels_sorted, stable=True)
        lab = by_label.values
        head = torch.ones(n, dtype=torch.bool, device=device)
        head[1:] = lab[1:] != lab[:-1]
        first_of_label = torch.empty_like(head).scatter_(0, by_label.indices, head)
    eligible = (scores_sorted > score_floor) | first_of_label

    iou = mask_iou_matrix(masks)[order][:, order]
    suppresses = (iou > iou_threshold) & (labels_sorted[:, None] == labels_sorted[None, :])
    # The greedy pass touches N-long bool vectors only; on the host it avoids a device sync per step.
    sup = suppresses.cpu().numpy()
    alive = eligible.cpu().numpy().copy()
    kept: list[int] = []
    for i in range(n):
        if alive[i]:
            kept.append(i)
            alive[i + 1:] &= ~sup[i, i + 1:]
    kept_t = torch.as_tensor(kept, dtype=torch.int64).to(device)
    return order[kept_t]


def greedy_mask_nms_loop(
    masks: np.ndarray | torch.Tensor,
    scores: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    iou_threshold: float = 0.3,
    score_floor: float = 0.001,
) -> np.ndarray:
    """The plain reference NMS of §3.4, literally: per label, a Python loop with one numpy IoU per pair.

    For tests and benchmarks only (O(N^2 * H * W)). Same semantics and tie-break as :func:`mask_nms`.

    Args:
        masks: ``(N, H, W)`` bool; scores ``(N,)``; labels ``(N,)`` int (numpy arrays or CPU tensors).

    Returns:
        ``(K,)`` int64 numpy indices of the kept candidates, by descending score (ties by index).
    """
    masks = np.asarray(masks.cpu() if isinstance(masks, torch.Tensor) else masks, dtype=bool)
    scores = np.asarray(scores.cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    kept: list[int] = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        cand_scores = scores[idx].copy()
        while len(idx):
            # Highest score; among equal scores the lowest index (np.argsort(kind="stable") on -score).
            best = int(np.argsort(-cand_scores, kind="stable")[0])
            best_mask = masks[idx[best]]
            kept.append(int(idx[best]))
            next_idx, next_scores = [], []
            for j in range(len(idx)):
                if j == best:
                    continue
                other = masks[idx[j]]
                inter = np.logical_and(other, best_mask).sum()
                union = np.logical_or(other, best_mask).sum()
                iou = inter / (union + 1e-7)
                s = cand_scores[j] * (0.0 if iou > iou_threshold else 1.0)
                if s > score_floor:
                    next_idx.append(idx[j])
                    next_scores.append(cand_scores[j])
            idx = np.asarray(next_idx, dtype=np.int64)
            cand_scores = np.asarray(next_scores, dtype=np.float64)
    kept_arr = np.sort(np.asarray(kept, dtype=np.int64))
    return kept_arr[np.argsort(-scores[kept_arr], kind="stable")] if len(kept_arr) else kept_arr


__all__ = ["mask_iou_matrix", "mask_nms", "greedy_mask_nms_loop"]
