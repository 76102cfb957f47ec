"""Zero-shot classification bookkeeping: normalisation, accuracy by split, the ZUTIS-style interpolated encoder,
and the evaluation images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import tiny_test_config
from model.training.shapes.clip_pretrain import build_clip
from model.training.shapes.world import ShapesWorld
from model.backbone import encode_patch_tokens
from model.training.shapes.zero_shot import (accuracy_by_split, encode_image_and_tokens, encode_image_interpolated,
                                    images_to_tensor, render_eval_set)

WORLD = ShapesWorld()


def test_accuracy_by_split_counts_seen_unseen_colour_and_shape() -> None:
    red_heart, red_circle, blue_heart = (WORLD.concept_id(n) for n in ("red heart", "red circle", "blue heart"))
    assert red_heart in WORLD.unseen_ids and red_circle in WORLD.seen_ids
    labels = np.array([red_heart, red_circle, red_circle, red_circle])
    predicted = np.array([red_heart, red_circle, blue_heart, red_heart])
    acc = accuracy_by_split(predicted, labels, WORLD)
    assert acc["acc"] == 0.5 and acc["acc_unseen"] == 1.0 and acc["acc_seen"] == pytest.approx(1 / 3)
    assert acc["acc_colour"] == 0.75 and acc["acc_shape"] == 0.5


def test_images_to_tensor_uses_the_config_normalisation() -> None:
    config = tiny_test_config(image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.5, 1.0))
    images = np.zeros((1, 2, 2, 3), np.uint8)
    images[..., 0] = 255
    x = images_to_tensor(images, config)
    assert x.shape == (1, 3, 2, 2)
    assert x[0, :, 0, 0].tolist() == pytest.approx([2.0, -1.0, -0.5])


@pytest.mark.parametrize("pool_type", ["tok", "avg"])
def test_encode_image_interpolated_matches_open_clip_when_positions_are_constant(pool_type: str) -> None:
    config = tiny_test_config(conv_stem=(8, 16))
    clip_config = config.open_clip_config()
    clip_config["vision_cfg"]["pool_type"] = pool_type
    towers = build_clip(tiny_test_config(conv_stem=(8, 16), clip_config=clip_config), seed=1)
    visual = towers.visual.eval()
    assert visual.pool_type == pool_type
    with torch.no_grad():
        visual.positional_embedding[1:] = visual.positional_embedding[1:2].clone()  # bicubic keeps a constant
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(encode_image_interpolated(visual, x), visual(x), rtol=1e-4, atol=1e-5)
    assert encode_image_interpolated(visual, torch.randn(1, 3, 128, 96)).shape == (1, 32)


def test_encode_image_and_tokens_projects_the_tokens_zutis_reads() -> None:
    towers = build_clip(tiny_test_config(conv_stem=(8, 16)), seed=2)
    visual = towers.visual.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        pooled, tokens = encode_image_and_tokens(visual, x)
        patch, h, w = encode_patch_tokens(visual, x)
    assert tokens.shape == (2, h * w, visual.proj.shape[1])
    torch.testing.assert_close(tokens, patch @ visual.proj)
    torch.testing.assert_close(pooled, encode_image_interpolated(visual, x))


def test_render_eval_set_has_every_concept_alone_and_is_reproducible() -> None:
    images, labels = render_eval_set(WORLD, 64, 2, seed=0)
    assert images.shape == (128, 64, 64, 3) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=65)[1:].tolist() == [2] * 64
    again, _ = render_eval_set(WORLD, 64, 2, seed=0)
    np.testing.assert_array_equal(images, again)
    other, _ = render_eval_set(WORLD, 64, 2, seed=0, stream=99)
    assert not np.array_equal(images, other)
