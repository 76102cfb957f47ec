"""The opt-in mask-branch options of ``ModelConfig`` (``mask_position``, ``mask_stop_gradient``): off by default,
invisible in the official config's serialisation, and doing what they say when switched on."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig, tiny_test_config
from model.training.criterion import mask_loss
from model.network import ZUTIS


def test_defaults_are_official_and_absent_from_the_serialised_config():
    cfg = tiny_test_config()
    assert cfg.mask_position is None and cfg.mask_stop_gradient is True
    d = cfg.to_dict()
    assert "mask_position" not in d and "mask_stop_gradient" not in d  # stage keys and checkpoints unchanged
    opted = tiny_test_config(mask_position="sine", mask_stop_gradient=False)
    assert ModelConfig.from_json(opted.to_json()) == opted


@pytest.mark.parametrize("field,value", [("mask_position", "learned"), ("mask_stop_gradient", "no")])
def test_invalid_values_are_rejected_with_the_field_name(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_test_config(**{field: value})


def test_sine_mask_position_changes_only_the_proposals_and_adds_no_parameters():
    torch.manual_seed(0)
    official = ZUTIS(tiny_test_config()).eval()
    sine = ZUTIS(tiny_test_config(mask_position="sine")).eval()
    sine.load_state_dict(official.state_dict(), strict=True)  # same keys and shapes
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = official(x), sine(x)
    assert torch.equal(a.semantic_features, b.semantic_features)
    assert not torch.allclose(a.mask_probs, b.mask_probs)


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_mask_loss_reaches_the_encoder_only_without_the_stop_gradient(stop_gradient):
    torch.manual_seed(0)
    model = ZUTIS(tiny_test_config(mask_stop_gradient=stop_gradient)).train()
    out = model(torch.randn(2, 3, 64, 64))
    targets = [torch.zeros(1, 64, 64, dtype=torch.bool) for _ in range(2)]
    for t in targets:
        t[0, 8:30, 10:40] = True
    mask_loss(out.all_layer_mask_probs(), targets).backward()
    grads = [p.grad for p in model.encoder.parameters() if p.requires_grad]
    reached = any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    assert reached is (not stop_gradient)
    assert model.ffn1.layers[0].weight.grad.abs().sum() > 0
