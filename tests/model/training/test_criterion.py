"""Criterion: loss values equal hand-computed values on tiny tensors; gradients reach only matched queries."""

from __future__ import annotations

import math

import pytest
import torch

from model.training.criterion import ce_loss, compute_losses, mask_loss, semantic_logits

# one image, one 2x2 instance; query 0 fits it well, query 1 is a flat 0.5 (hand-computed costs below)
P0 = [[0.9, 0.1], [0.2, 0.7]]
P1 = [[0.5, 0.5], [0.5, 0.5]]
G = [[1.0, 0.0], [0.0, 1.0]]
DICE0 = 1 - (2 * (0.9 + 0.7) + 1) / ((0.9 + 0.1 + 0.2 + 0.7) + 2 + 1)
BCE0 = -(math.log(0.9) + math.log(0.9) + math.log(0.8) + math.log(0.7)) / 4
DICE1 = 1 - (2 * 1.0 + 1) / (2.0 + 2 + 1)
BCE1 = math.log(2.0)


def test_mask_loss_hand_computed_sum_over_layers_mean_over_batch_with_empty_image():
    layer0 = torch.tensor([P0, P1])
    layer1 = torch.tensor([P1, P0])  # the second layer's best query is query 1
    probs = torch.stack([torch.stack([layer0, layer1]), torch.rand(2, 2, 2, 2)])  # (B=2, L=2, Q=2, 2, 2)
    probs.requires_grad_(True)
    targets = [torch.tensor([G]).bool(), torch.zeros(1, 2, 2, dtype=torch.bool)]  # image 2: no instance pixels
    loss = mask_loss(probs, targets)
    expected = (2 * (DICE0 + BCE0)) / 2  # two layers of image 1, divided by B = 2
    assert DICE0 + BCE0 < DICE1 + BCE1
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    grad = probs.grad
    assert grad[0, 0, 0].abs().sum() > 0 and grad[0, 1, 1].abs().sum() > 0  # matched queries
    assert grad[0, 0, 1].abs().sum() == 0 and grad[0, 1, 0].abs().sum() == 0  # unmatched: no no-object term
    assert grad[1].abs().sum() == 0


def test_mask_loss_sums_matched_pairs_and_upsamples_to_the_target_size():
    # a constant map upsamples to itself; two instances, two constant queries
    probs = torch.tensor([[[[[0.8]], [[0.3]]]]]).expand(1, 1, 2, 1, 1)  # (1, 1, Q=2, 1, 1)
    targets = torch.zeros(2, 2, 3, dtype=torch.bool)
    targets[0] = True  # full instance
    targets[1, 0, 0] = True  # one-pixel instance

    def cost(p: float, g: torch.Tensor) -> float:
        gs, n = g.sum().item(), g.numel()
        dice = 1 - (2 * p * gs + 1) / (p * n + gs + 1)
        bce = -(gs * math.log(p) + (n - gs) * math.log(1 - p)) / n
        return dice + bce

    options = [cost(0.8, targets[0]) + cost(0.3, targets[1]), cost(0.3, targets[0]) + cost(0.8, targets[1])]
    assert mask_loss(probs, [targets]).item() == pytest.approx(min(options), rel=1e-6)


def test_ce_loss_hand_computed_raw_cosine_logits_and_ignore_index():
    feats = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)  # (B, h', w', E): upsampled to a constant map
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # logits are [1, 0] everywhere: no logit scale
    target = torch.tensor([[[0, 1], [255, 0]]])
    expected = (2 * -math.log(math.e / (math.e + 1)) - math.log(1 / (math.e + 1))) / 3
    assert ce_loss(feats, text, target, 255).item() == pytest.approx(expected, rel=1e-6)
    assert ce_loss(feats, text, torch.full((1, 2, 2), 255), 255).item() == 0.0


def test_ce_loss_logit_scale_multiplies_the_cosine_logits():
    feats = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # logits [10, 0] at scale 10
    target = torch.tensor([[[0, 1], [255, 0]]])
    expected = (2 * -math.log(math.exp(10) / (math.exp(10) + 1)) - math.log(1 / (math.exp(10) + 1))) / 3
    assert ce_loss(feats, text, target, 255, logit_scale=10.0).item() == pytest.approx(expected, rel=1e-6)


def test_semantic_logits_are_the_same_whichever_side_is_upsampled():
    gen = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(2, 3, 4, 5, generator=gen), dim=-1)
    few = torch.randn(3, 5, generator=gen)  # C <= E: logits upsampled
    many = torch.randn(7, 5, generator=gen)  # C > E: features upsampled
    for text in (few, many):
        up = torch.nn.functional.interpolate(feats.permute(0, 3, 1, 2), size=(8, 11), mode="bilinear",
                                             align_corners=False)
        reference = torch.einsum("behw,ce->bchw", up, text)
        torch.testing.assert_close(semantic_logits(feats, text, (8, 11)), reference, rtol=1e-5, atol=1e-6)


def test_compute_losses_returns_named_unweighted_losses():
    probs = torch.rand(1, 2, 3, 2, 2)
    feats = torch.nn.functional.normalize(torch.randn(1, 2, 2, 4), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    sem = torch.randint(0, 3, (1, 4, 4))
    inst = [torch.rand(2, 4, 4) > 0.5]
    losses = compute_losses(probs, feats, text, sem, inst, 255)
    assert set(losses) == {"mask", "ce"}
    assert losses["mask"].item() == pytest.approx(mask_loss(probs, inst).item())
    assert losses["ce"].item() == pytest.approx(ce_loss(feats, text, sem, 255).item())
