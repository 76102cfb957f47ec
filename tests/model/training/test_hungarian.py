"""Matcher: the matmul-form cost equals the elementwise definition, and Hungarian equals brute force."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from model.training.hungarian import hungarian, mask_cost, match_layers, resize_mask_probs


def _reference_cost(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Elementwise definition (reference §4.2): one pair at a time with F.binary_cross_entropy."""
    k, q = targets.shape[0], probs.shape[0]
    cost = torch.empty(k, q, dtype=torch.float64)
    for i in range(k):
        for j in range(q):
            p, g = probs[j].double(), targets[i].double()
            dice = 1 - (2 * (p * g).sum() + 1) / (p.sum() + g.sum() + 1)
            cost[i, j] = dice + F.binary_cross_entropy(p, g)
    return cost


def test_mask_cost_equals_elementwise_definition_including_saturated_probabilities():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(5, 30, generator=g)
    probs[0, :4] = torch.tensor([0.0, 1.0, 0.0, 1.0])  # log clamps at -100 must match binary_cross_entropy
    targets = (torch.rand(3, 30, generator=g) > 0.5).float()
    targets[2] = 0.0  # an all-zero (occluded) instance
    torch.testing.assert_close(mask_cost(probs, targets).double(), _reference_cost(probs, targets),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,q,seed", [(1, 1, 0), (2, 4, 1), (3, 5, 2), (4, 4, 3), (4, 6, 4)])
def test_hungarian_equals_brute_force(k, q, seed):
    cost = torch.rand(k, q, generator=torch.Generator().manual_seed(seed))
    rows, cols = hungarian(cost)
    assert rows.tolist() == list(range(k)) and len(set(cols.tolist())) == k
    best = min(itertools.permutations(range(q), k), key=lambda perm: sum(cost[i, j].item() for i, j in enumerate(perm)))
    assert cols.tolist() == list(best)


def test_match_layers_matches_each_layer_on_upsampled_probabilities():
    gen = torch.Generator().manual_seed(5)
    layer_probs = torch.rand(3, 6, 4, 4, generator=gen)  # (L, Q, h', w')
    targets = torch.rand(3, 8, 8, generator=gen) > 0.6  # (K, H, W), twice the grid
    pairs = match_layers(layer_probs, targets)
    assert len(pairs) == 3
    for probs, (rows, cols) in zip(layer_probs, pairs):
        up = F.interpolate(probs[None], size=(8, 8), mode="bilinear", align_corners=False)[0]
        cost = _reference_cost(up.reshape(6, -1), targets.reshape(3, -1).float())
        best = min(itertools.permutations(range(6), 3), key=lambda p: sum(cost[i, j].item() for i, j in enumerate(p)))
        assert rows.tolist() == [0, 1, 2] and cols.tolist() == list(best)


def test_match_layers_without_instances_returns_empty_pairs():
    pairs = match_layers(torch.rand(2, 4, 3, 3), torch.zeros(0, 6, 6, dtype=torch.bool))
    assert [(r.numel(), c.numel()) for r, c in pairs] == [(0, 0), (0, 0)]


def test_resize_mask_probs_is_identity_at_the_same_size():
    x = torch.rand(2, 3, 5, 7)
    assert torch.equal(resize_mask_probs(x, (5, 7)), x)
    assert resize_mask_probs(x, (10, 14)).shape == (2, 3, 10, 14)
