"""Hungarian matching of mask proposals to ground-truth instances (reference §4.2): cost matrices and index pairs.

The cost of query ``q`` for instance ``k`` is ``dice + bce`` on soft probabilities at the crop resolution:
``dice = 1 - (2 <P_q, G_k> + 1) / (sum P_q + sum G_k + 1)`` and ``bce`` the pixel mean of
``F.binary_cross_entropy(P_q, G_k)``, computed in matmul form (never a Q x K x HW tensor; reference §4.2).
Nothing here has a gradient; the criterion turns the pairs into losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def resize_mask_probs(probs: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) of probability maps ``(..., h', w')`` to ``(..., H, W)``."""
    lead = probs.shape[:-2]
    x = probs.reshape(-1, 1, *probs.shape[-2:])
    if tuple(x.shape[-2:]) != tuple(size_hw):
        x = F.interpolate(x, size=tuple(size_hw), mode="bilinear", align_corners=False)
    return x.reshape(*lead, *size_hw)


def mask_cost(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Matching cost ``dice + bce`` for every (instance, query) pair.

    ``probs``: (Q, N) mask probabilities in [0, 1]; ``targets``: (K, N) float 0/1 (N pixels).
    Returns (K, Q) float32. The BCE logs are clamped at -100, as ``F.binary_cross_entropy`` does.
    """
    p, g = probs.float(), targets.float()
    n = p.shape[-1]
    dice = 1.0 - (2.0 * (g @ p.T) + 1.0) / (g.sum(-1)[:, None] + p.sum(-1)[None, :] + 1.0)
    log_p = torch.log(p).clamp(min=-100.0)
    log_1mp = torch.log1p(-p).clamp(min=-100.0)
    # g.log p + (1-g).log(1-p) = g.(log p - log(1-p)) + sum log(1-p): one matmul, no (1-g) tensor
    bce = -(g @ (log_p - log_1mp).T + log_1mp.sum(-1)[None, :]) / n
    return dice + bce


def hungarian(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost assignment of a (K, Q) cost matrix: (instance indices, query indices), int64, sorted by
    instance; ``min(K, Q)`` pairs (scipy ``linear_sum_assignment``)."""
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


@torch.no_grad()
def match_layers(layer_mask_probs: torch.Tensor,
                 instance_masks: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Match every decoder layer's proposals of one image to its instances.

    ``layer_mask_probs``: (L, Q, h', w') probabilities; ``instance_masks``: (K, H, W) bool/0-1, the crop's targets.
    Proposals are resized bilinearly to (H, W) first. Returns one ``(instance_idx, query_idx)`` pair of (K,) int64
    CPU tensors per layer (empty tensors when K == 0).
    """
    k = instance_masks.shape[0]
    if k == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return [(empty, empty) for _ in range(layer_mask_probs.shape[0])]
    size_hw = tuple(instance_masks.shape[-2:])
    targets = instance_masks.reshape(k, -1).float()
    pairs = []
    for probs in layer_mask_probs:  # one layer at a time bounds memory at Q x H x W
        up = resize_mask_probs(probs.float(), size_hw).reshape(probs.shape[0], -1)
        pairs.append(hungarian(mask_cost(up, targets)))
    return pairs


__all__ = ["resize_mask_probs", "mask_cost", "hungarian", "match_layers"]
