"""The losses of shapes-world CLIP pre-training and the batch bookkeeping they need.

- ``contrastive_loss``: CLIP's symmetric InfoNCE, except that several images in a batch often show the same
  concepts; every image/caption pair with the same content counts as a positive (uniform soft targets over them,
  from ``content_groups``) instead of pushing identical captions apart.
- ``dense_concept_loss`` (the recipe's ``dense_weight`` > 0; the shipped recipe uses it): asks that some projected
  patch token match each concept the caption names (targets from ``concept_targets``), with captions only, never
  masks: the contrastive loss alone teaches shape to the pooled embedding but hardly to the patch tokens that
  ZUTIS reads (docs/benchmarks.md, rung R1).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def contrastive_loss(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: torch.Tensor,
                     group_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets: pairs (i, j) with ``group_ids[i] == group_ids[j]`` are positives.

    ``image_embeddings``, ``text_embeddings``: (B, E) unit-norm. ``logit_scale``: scalar, log of the inverse
    temperature. ``group_ids``: (B,) int, equal for images of equal content. With all ids distinct this is
    CLIP's loss. Returns a scalar (mean over both directions).
    """
    logits = logit_scale.exp() * image_embeddings @ text_embeddings.t()
    same = (group_ids[:, None] == group_ids[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)  # symmetric, so it serves both directions
    loss_i = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t = -(targets * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    return (loss_i + loss_t) / 2


def dense_concept_loss(tokens: torch.Tensor, concept_embeddings: torch.Tensor, targets: torch.Tensor,
                       logit_scale: torch.Tensor, tau: float = 10.0) -> torch.Tensor:
    """The dense patch-to-concept term: a multiple-instance loss that needs captions only, no masks.

    ``tokens``: (B, N, E) unit-norm projected patch tokens; ``concept_embeddings``: (K, E) unit-norm text
    embeddings of the K concept names; ``targets``: (B, K), each row uniform over the concepts visible in the
    image (rows of zeros, clutter-only images, are skipped); ``logit_scale``: scalar log inverse temperature.
    Each concept's score in an image is the soft maximum over patches of the patch-concept cosine,
    ``(logsumexp(tau * s) - log N) / tau``, so that some patch must match every named concept and no patch need
    match an absent one; softmax cross-entropy over the K concepts against ``targets``. Returns a scalar (0 when
    no row has a target).
    """
    n = tokens.shape[1]
    cosine = tokens @ concept_embeddings.t()  # (B, N, K)
    pooled = (torch.logsumexp(tau * cosine, dim=1) - math.log(n)) / tau  # (B, K)
    keep = targets.sum(dim=1) > 0
    if not bool(keep.any()):
        return pooled.sum() * 0.0
    log_p = F.log_softmax(logit_scale.exp() * pooled[keep], dim=1)
    return -(targets[keep] * log_p).sum(dim=1).mean()


def concept_targets(contents: Sequence[tuple[int, ...]], num_concepts: int) -> torch.Tensor:
    """(B, K) float: row b uniform over the concept ids (1..K) in ``contents[b]``, zeros for an empty image."""
    targets = torch.zeros(len(contents), num_concepts)
    for b, ids in enumerate(contents):
        if ids:
            targets[b, [i - 1 for i in set(ids)]] = 1.0 / len(set(ids))
    return targets


def content_groups(contents: Sequence[tuple[int, ...]]) -> torch.Tensor:
    """(B,) int64 group ids, equal exactly for equal contents (e.g. the sorted concept ids in each image)."""
    index = {c: i for i, c in enumerate(dict.fromkeys(contents))}
    return torch.tensor([index[c] for c in contents], dtype=torch.int64)


__all__ = ["contrastive_loss", "dense_concept_loss", "concept_targets", "content_groups"]
