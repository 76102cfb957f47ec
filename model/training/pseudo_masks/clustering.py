"""Spectral-cluster voting (reference §5.4): candidate segments of feature grids, the long-mask filter, the vote.

For every feature extractor and every k in ``ks`` (default {2, 3, 4}): the extractor's feature grid is upsampled
2x (bilinear, align_corners=True), tokens are L2-normalised, the affinity ``A = F F^T`` is min-max normalised to
[0, 1], and the k smallest generalised eigenvectors of ``L v = lambda D v`` (``L = D - A``, ``D = diag(A 1)``) are
clustered with k-means into k segments (``spectral_candidates``). The segments of all extractors and all k are the
candidates; "long" candidates (bounding box spanning the full height or width: background-like) are dropped unless
that drops all (``filter_long_masks``), and the candidate with the largest summed IoU against the others wins the
vote (``vote``). ``salient_mask`` runs the whole vote for one image.

Eigenvectors are computed exactly and cheaply when tokens outnumber feature dimensions: ``A`` has rank <= d + 1,
so the symmetric ``D^-1/2 A D^-1/2`` is diagonalised through a thin QR of ``D^-1/2 [F, 1]`` (O(N d^2) time,
O(N d) memory) rather than a dense O(N^3) ``eigh`` (used, as the reference, when N <= d + 1).

The vote's IoU is ``model.mask_iou.pairwise_iou`` (float32, two empty masks agree); the feature extractors are in
``model.training.pseudo_masks.features``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.mask_iou import pairwise_iou
from model.training.pseudo_masks.features import FeatureExtractor

DEFAULT_KS = (2, 3, 4)


# -- spectral clustering ---------------------------------------------------------------------------------------
def _min_similarity(features: torch.Tensor) -> torch.Tensor:
    """``min_ij f_i . f_j`` over all token pairs, in the features' dtype.

    The minimising pair is searched in float32 row chunks of at most 2**22 products (never the full N x N
    matrix), then its product is recomputed in the features' own precision.
    """
    f32 = features.float()
    chunk = max(1, 2 ** 22 // f32.shape[0])
    best, best_i, best_j = math.inf, 0, 0
    for start in range(0, f32.shape[0], chunk):
        products = f32[start:start + chunk] @ f32.T
        flat = int(products.argmin())
        value = float(products.view(-1)[flat])
        if value < best:
            best, best_i, best_j = value, start + flat // f32.shape[0], flat % f32.shape[0]
    return features[best_i] @ features[best_j]


def spectral_embedding(features: torch.Tensor, k: int) -> torch.Tensor | None:
    """The ``k`` smallest generalised eigenvectors of ``L v = lambda D v`` for the min-max-normalised cosine graph.

    Args:
        features: ``(N, d)`` float, already L2-normalised per token.
        k: eigenvectors wanted (the trivial constant one included, as in the official ``lobpcg`` call).

    Returns:
        float64 ``(N, k)`` eigenvectors ordered by eigenvalue (smallest first), D-orthonormal
        (``v^T D v = I``), or ``None`` when all affinities are equal to float32 precision (the graph carries
        no structure).
    """
    f = features.double()
    n, d = f.shape
    top = (f * f).sum(dim=1).max()  # max_ij f_i . f_j is on the diagonal (Cauchy-Schwarz)
    low = _min_similarity(f)
    span = top - low
    if span <= 1e-6 * max(float(top), 1e-30):
        return None
    if n <= d + 1:
        return _eigenvectors_dense(f, low, span, k)
    # A = (F F^T - low 1 1^T) / span = U C U^T with U = [F, 1]: everything below stays N x (d + 1).
    u = torch.cat([f, torch.ones(n, 1, dtype=f.dtype, device=f.device)], dim=1)
    c = torch.cat([torch.full((d,), 1.0, dtype=f.dtype, device=f.device), -low.reshape(1)]) / span
    degree = (u @ (c * u.sum(dim=0))).clamp_min(1e-12)
    inv_sqrt_degree = degree.rsqrt()
    q, r = torch.linalg.qr(u * inv_sqrt_degree[:, None])  # D^-1/2 A D^-1/2 = Q (R C R^T) Q^T
    small = (r * c) @ r.T
    values, vectors = torch.linalg.eigh((small + small.T) / 2)
    # Smallest eigenvalues of I - D^-1/2 A D^-1/2 are the largest of D^-1/2 A D^-1/2. Directions outside
    # span(Q) have eigenvalue 1 in I - S: they carry no information and are never needed for k <= rank.
    order = torch.argsort(values, descending=True)[:k]
    return inv_sqrt_degree[:, None] * (q @ vectors[:, order])


def _eigenvectors_dense(f: torch.Tensor, low: torch.Tensor, span: torch.Tensor, k: int) -> torch.Tensor:
    """Reference solve: the dense symmetric eigenproblem of ``D^-1/2 L D^-1/2`` with ``torch.linalg.eigh``."""
    a = (f @ f.T - low) / span
    degree = a.sum(dim=1).clamp_min(1e-12)
    inv_sqrt_degree = degree.rsqrt()
    laplacian = torch.diag(degree) - a
    sym = inv_sqrt_degree[:, None] * laplacian * inv_sqrt_degree[None, :]
    _, vectors = torch.linalg.eigh((sym + sym.T) / 2)  # ascending eigenvalues
    return inv_sqrt_degree[:, None] * vectors[:, :k]


def kmeans(points: torch.Tensor, k: int, n_init: int = 10, max_iter: int = 300, tol: float = 1e-4,
           seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding, best of ``n_init`` runs by inertia (sklearn's defaults).

    Deterministic: seeding draws from a CPU ``torch.Generator(seed)``. Converges when the squared centre shift
    is below ``tol`` times the mean per-dimension variance. Labels are renumbered in order of first appearance,
    so equal partitions give equal labels.

    Args:
        points: ``(N, d)`` float on any device; ``N >= k >= 1``.

    Returns:
        int64 ``(N,)`` cluster labels in ``[0, k)`` on the points' device.
    """
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= N, got k={k} for N={n}")
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"n_init and max_iter must be positive, got {n_init} and {max_iter}")
    # Float32 on a unit overall scale: k-means is scale-invariant, and eigenvector entries are tiny (~N^-1/2).
    x = points.double()
    x = (x / x.std().clamp_min(1e-300)).float()
    generator = torch.Generator().manual_seed(seed)
    tol_abs = tol * x.var(dim=0, unbiased=False).mean()
    x_sq = (x * x).sum(dim=1, keepdim=True)
    best_labels, best_inertia = None, math.inf
    for _ in range(n_init):
        centres = _kmeans_plusplus(x, k, generator, x_sq)
        for _ in range(max_iter):
            distances = _squared_distances(x, centres, x_sq)
            labels = distances.argmin(dim=1)
            counts = torch.bincount(labels, minlength=k)
            sums = torch.zeros_like(centres).index_add_(0, labels, x)
            new = sums / counts.clamp_min(1)[:, None].to(x.dtype)
            for empty in torch.nonzero(counts == 0).flatten().tolist():  # re-seed at the worst-fit point
                far = distances.gather(1, labels[:, None]).squeeze(1).argmax()
                new[empty] = x[far]
                distances[far] = 0.0
            shift = ((new - centres) ** 2).sum()
            centres = new
            if shift <= tol_abs:
                break
        distances = _squared_distances(x, centres, x_sq)
        inertia, labels = distances.min(dim=1)
        if float(inertia.sum()) < best_inertia:
            best_inertia, best_labels = float(inertia.sum()), labels
    assert best_labels is not None
    first = torch.full((k,), n, dtype=torch.int64, device=x.device).scatter_reduce_(
        0, best_labels, torch.arange(n, device=x.device), reduce="amin")
    rank = torch.empty(k, dtype=torch.int64, device=x.device)
    rank[torch.argsort(first)] = torch.arange(k, device=x.device)
    return rank[best_labels]


def _squared_distances(x: torch.Tensor, centres: torch.Tensor, x_sq: torch.Tensor) -> torch.Tensor:
    """``(N, k)`` squared distances; ``x_sq`` is ``(N, 1)`` row norms squared, computed once per k-means call."""
    return (x_sq - 2 * x @ centres.T + (centres * centres).sum(1)[None, :]).clamp_min(0.0)


def _kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator, x_sq: torch.Tensor) -> torch.Tensor:
    """k-means++ seeding: ``(k, d)`` initial centres drawn from the ``(N, d)`` points with ``generator``."""
    n = x.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = _squared_distances(x, x[chosen], x_sq).squeeze(1)
    for _ in range(1, k):
        weights = nearest.cpu()
        if float(weights.sum()) <= 0.0:  # every point already coincides with a centre
            weights = torch.ones(n, dtype=weights.dtype)
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        nearest = torch.minimum(nearest, _squared_distances(x, x[chosen[-1:]], x_sq).squeeze(1))
    return x[chosen].clone()


def spectral_candidates(features: torch.Tensor, size_hw: tuple[int, int], ks: Sequence[int] = DEFAULT_KS,
                        max_tokens: int = 16384, n_init: int = 10, seed: int = 0) -> torch.Tensor:
    """Candidate masks of one feature grid: the k segments of spectral clustering for each k in ``ks``.

    Args:
        features: ``(h, w, d)`` float; the grid spans the whole image.
        size_hw: ``(H, W)`` of the returned masks (segments are resized nearest-neighbour).
        max_tokens: cap on ``N``; a larger upsampled grid is area-resampled down to fit (aspect kept).

    Returns:
        bool ``(sum(ks), H, W)`` on the features' device (no candidates when the graph is structureless).
    """
    if features.ndim != 3:
        raise ValueError(f"features must be (h, w, d), got shape {tuple(features.shape)}")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive cluster counts, got {list(ks)}")
    grid = features.float().permute(2, 0, 1)[None]
    grid = F.interpolate(grid, scale_factor=2.0, mode="bilinear", align_corners=True)
    gh, gw = grid.shape[-2:]
    if gh * gw > max_tokens:
        scale = math.sqrt(max_tokens / (gh * gw))
        grid = F.interpolate(grid, size=(max(1, int(gh * scale)), max(1, int(gw * scale))), mode="area")
        gh, gw = grid.shape[-2:]
    tokens = F.normalize(grid.flatten(2)[0].T, dim=1)  # (N, d)
    kmax = min(max(ks), tokens.shape[0])
    vectors = spectral_embedding(tokens, kmax)
    height, width = size_hw
    if vectors is None:
        return torch.zeros(0, height, width, dtype=torch.bool, device=features.device)
    masks = []
    for k in ks:
        k = min(k, tokens.shape[0])
        labels = kmeans(vectors[:, :k], k, n_init=n_init, seed=seed).view(1, 1, gh, gw)
        one_hot = (labels == torch.arange(k, device=labels.device).view(k, 1, 1, 1)).float().transpose(0, 1)
        masks.append(F.interpolate(one_hot, size=(height, width), mode="nearest-exact")[0] > 0.5)
    return torch.cat(masks).to(features.device)


# -- filtering and voting --------------------------------------------------------------------------------------
def is_long_mask(masks: torch.Tensor) -> torch.Tensor:
    """Whether each mask's bounding box spans the full height or the full width (background-like).

    ``masks``: bool ``(M, H, W)``. Returns bool ``(M,)``; empty masks are not long.
    """
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # (M, H), (M, W)
    return (rows[:, 0] & rows[:, -1]) | (cols[:, 0] & cols[:, -1])


def filter_long_masks(masks: torch.Tensor) -> torch.Tensor:
    """Drop long masks (``is_long_mask``); if that would drop every mask, keep them all. bool ``(M', H, W)``."""
    keep = ~is_long_mask(masks)
    return masks[keep] if bool(keep.any()) else masks


def vote(masks: torch.Tensor) -> int:
    """Index of the mask with the largest summed IoU (``model.mask_iou.pairwise_iou``) against all masks (itself
    included); first on ties. ``masks``: bool ``(M, H, W)`` with ``M >= 1``, else ``ValueError``."""
    if masks.shape[0] == 0:
        raise ValueError("no candidate masks to vote between")
    return int(pairwise_iou(masks).sum(dim=1).argmax())


def salient_mask(image: Any, extractors: Mapping[str, FeatureExtractor] | Sequence[FeatureExtractor],
                 ks: Sequence[int] = DEFAULT_KS, max_tokens: int = 16384, max_mask_side: int = 512,
                 n_init: int = 10, seed: int = 0) -> np.ndarray | None:
    """The voted salient-object mask of one PIL image: bool ``(H, W)`` numpy, or ``None`` without candidates.

    Candidates and the vote are computed at a working size whose longer side is at most ``max_mask_side``
    pixels; the winner is resized nearest-neighbour to the full ``(H, W)``.
    """
    extractor_list = list(extractors.values()) if isinstance(extractors, Mapping) else list(extractors)
    if not extractor_list:
        raise ValueError("at least one feature extractor is needed")
    width, height = image.size
    scale = min(1.0, max_mask_side / max(height, width))
    work_hw = (max(1, round(height * scale)), max(1, round(width * scale)))
    candidates = [spectral_candidates(extract(image), work_hw, ks, max_tokens, n_init, seed).cpu()
                  for extract in extractor_list]
    masks = torch.cat(candidates)
    masks = masks[masks.flatten(1).any(dim=1)]
    if masks.shape[0] == 0:
        return None
    masks = filter_long_masks(masks)
    winner = masks[vote(masks)]
    if work_hw != (height, width):
        winner = F.interpolate(winner[None, None].float(), size=(height, width), mode="nearest-exact")[0, 0] > 0.5
    return winner.numpy()


__all__ = ["DEFAULT_KS", "spectral_embedding", "kmeans", "spectral_candidates", "is_long_mask",
           "filter_long_masks", "vote", "salient_mask"]
