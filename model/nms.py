"""Class-wise hard mask NMS (reference §3.4), vectorised, plus the plain greedy loop it must agree with.

Semantics, per label: repeatedly take the highest-scoring remaining candidate (it is kept whatever its score),
then discard every other remaining candidate whose mask IoU with it is ``> iou_threshold`` or whose score is
``<= score_floor``. Masks of different labels never suppress each other.

Ties: the official code sorts with ``np.argsort`` (unstable), so among equal scores its choice is arbitrary.
Here equal scores are broken by index (lower index first) in both implementations.

Two exact strategies give identical results: ``"matrix"`` (the whole IoU matrix from one chunked matmul, then a
greedy pass over bool vectors; best on GPUs) and ``"greedy"`` (IoUs only between each kept mask and the remaining
candidates of its label whose boxes overlap it, counted inside the kept mask's box; best on CPUs, where the
greedy selection keeps few masks and a float copy of every mask would dominate the cost).

Mask areas and the IoU matrix (with the reference's ``I / (U + 1e-7)`` convention: an empty mask overlaps nothing)
come from ``model.mask_iou``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from model.mask_iou import flatten_masks, mask_areas, mask_iou_matrix
from model.rle import masks_to_boxes_xywh  # boxes are the RLE module's concept


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
    strategy: Literal["auto", "matrix", "greedy"] = "auto",
) -> torch.Tensor:
    """Class-wise hard mask NMS with the semantics of reference §3.4 (see the module docstring).

    Candidates are visited once in score order with an ``N``-long "alive" vector; each kept candidate clears the
    alive flag of the remaining same-label candidates it overlaps by IoU ``> iou_threshold``. The IoUs come from
    one matmul over all masks (``strategy="matrix"``) or, per kept candidate, from the remaining same-label
    masks cropped to its box (``"greedy"``); ``"auto"`` picks ``"matrix"`` on CUDA and ``"greedy"`` elsewhere.
    Both count exactly and give identical results.

    Args:
        masks: ``(N, H, W)`` or ``(N, P)`` bool.
        scores: ``(N,)`` float, finite.
        labels: ``(N,)`` integer class ids.
        iou_threshold: a candidate is suppressed by a kept one of its label when their IoU is strictly greater.
        score_floor: candidates with ``score <= score_floor`` are dropped, except the best of each label.
        strategy: how IoUs are computed (see above).

    Returns:
        ``(K,)`` int64 indices into the inputs of the kept candidates, by descending score (ties by index),
        on the masks' device.
    """
    flatten_masks(masks)  # validates dtype and shape
    n = _check_candidates(masks, scores, labels)
    if strategy not in ("auto", "matrix", "greedy"):
        raise ValueError(f"unknown NMS strategy {strategy!r}; use 'auto', 'matrix' or 'greedy'")
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
    # The greedy pass runs on the host: N-long bool vectors, no device sync per step.
    alive = ((scores_sorted > score_floor) | first_of_label).cpu().numpy().copy()
    if strategy == "auto":
        strategy = "matrix" if device.type == "cuda" else "greedy"
    if strategy == "matrix":
        kept = _greedy_pass_matrix(masks, order, labels_sorted, alive, iou_threshold)
    else:
        kept = _greedy_pass_cropped(masks, order, labels_sorted, alive, iou_threshold)
    return order[torch.as_tensor(kept, dtype=torch.int64).to(device)]


def _greedy_pass_matrix(masks: torch.Tensor, order: torch.Tensor, labels_sorted: torch.Tensor, alive: np.ndarray,
                        iou_threshold: float) -> list[int]:
    iou = mask_iou_matrix(masks)[order][:, order]
    sup = ((iou > iou_threshold) & (labels_sorted[:, None] == labels_sorted[None, :])).cpu().numpy()
    kept: list[int] = []
    for i in range(len(alive)):
        if alive[i]:
            kept.append(i)
            alive[i + 1:] &= ~sup[i, i + 1:]
    return kept


def _greedy_pass_cropped(masks: torch.Tensor, order: torch.Tensor, labels_sorted: torch.Tensor, alive: np.ndarray,
                         iou_threshold: float) -> list[int]:
    masks3 = masks if masks.ndim == 3 else masks[:, None, :]  # (N, H, W), input order
    src = order.cpu().numpy()  # sorted position -> input index
    areas = mask_areas(masks3).cpu().numpy().astype(np.float64)[src]
    xywh = masks_to_boxes_xywh(masks3).cpu().numpy().astype(np.int64)[src]
    x0, y0 = xywh[:, 0], xywh[:, 1]
    x1, y1 = x0 + xywh[:, 2], y0 + xywh[:, 3]  # exclusive; empty masks get an empty box
    labels_np = labels_sorted.cpu().numpy()
    kept: list[int] = []
    for i in range(len(alive)):
        if not alive[i]:
            continue
        kept.append(i)
        rest = np.flatnonzero(alive[i + 1:]) + (i + 1)
        # Only same-label candidates whose boxes overlap can have a non-zero IoU.
        rest = rest[(labels_np[rest] == labels_np[i]) & (x0[rest] < x1[i]) & (x1[rest] > x0[i])
                    & (y0[rest] < y1[i]) & (y1[rest] > y0[i])]
        if len(rest) == 0:
            continue
        crop = masks3[int(src[i]), y0[i]:y1[i], x0[i]:x1[i]]
        others = masks3[torch.as_tensor(src[rest], device=masks3.device), y0[i]:y1[i], x0[i]:x1[i]]
        inter = mask_areas(others & crop).cpu().numpy().astype(np.float64)
        iou = inter / (areas[i] + areas[rest] - inter + 1e-7)
        alive[rest[iou > iou_threshold]] = False
    return kept


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


__all__ = ["mask_nms", "greedy_mask_nms_loop"]
