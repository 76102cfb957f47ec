"""Checks of the independent official-forward reference itself (tests/model/official_reference.py).

The reference is what the converter test trusts, so it is checked here against the specification's numbers
(key and parameter counts of the released checkpoints), against torch / open_clip building blocks where the
official code is a plain copy of them, and on hand-made post-processing cases.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.model.official_reference import (
    TINY,
    TINY_VIT,
    count_parameters,
    decode,
    encode_image,
    encode_text,
    hard_nms,
    instance_prediction,
    interpolate_positional_embedding,
    official_forward,
    predict,
    random_official_state_dict,
    semantic_prediction,
    sine_positional_encoding,
)



@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return random_official_state_dict(**TINY, seed=0)


@pytest.mark.parametrize("patch,grid,params,encoder_params", [(16, 14, 134_458_368, 86_192_640),
                                                               (32, 7, 136_114_944, 87_849_216)])
def test_random_official_state_dict_vit_b_key_and_parameter_counts(patch, grid, params, encoder_params) -> None:
    state = random_official_state_dict(768, 12, 12, patch, grid, 512, 100, 6, 8, 2048, 256, device="meta")
    keys = list(state)
    assert len(keys) == 275
    assert count_parameters(state) == params
    assert sum(v.numel() for k, v in state.items() if k.startswith("encoder.")) == encoder_params
    # iteration order of the official state_dict (§1.10)
    assert keys[:5] == ["query_embed", "encoder.class_embedding", "encoder.positional_embedding", "encoder.proj",
                        "encoder.conv1.weight"]
    assert keys.index("encoder.ln_post.weight") == keys.index("encoder.transformer.resblocks.11.ln_2.bias") + 1
    assert keys[-2:] == ["decoder.norm.weight", "decoder.norm.bias"]
    assert state["query_embed"].shape == (100, 768) and "query_embed.weight" not in state
    assert state["encoder.conv1.weight"].shape == (768, 3, patch, patch)
    assert state["encoder.positional_embedding"].shape == (grid * grid + 1, 768)
    assert state["decoder.layers.5.multihead_attn.in_proj_weight"].shape == (2304, 768)
    assert state["decoder.layers.0.linear1.weight"].shape == (2048, 768)


def test_random_official_state_dict_is_seeded(tiny_state) -> None:
    again = random_official_state_dict(**TINY, seed=0)
    other = random_official_state_dict(**TINY, seed=1)
    assert all(torch.equal(tiny_state[k], again[k]) for k in tiny_state)
    assert not torch.equal(tiny_state["query_embed"], other["query_embed"])
    assert all(v.dtype == torch.float32 for v in tiny_state.values())


@pytest.mark.parametrize("h,w", [(14, 14), (40, 30), (7, 3), (1, 1), (64, 48)])
def test_interpolate_positional_embedding_sizes_and_cls_row(h, w) -> None:
    pos = torch.randn(14 * 14 + 1, 16)
    out = interpolate_positional_embedding(pos, h, w)
    assert out.shape == (1 + h * w, 16)
    assert torch.equal(out[0], pos[0])


def test_interpolate_positional_embedding_is_not_identity_at_native_grid() -> None:
    # scale_factor (g+0.1)/g compresses the sampling grid slightly (§1.2): not the same as size=(g, g)
    pos = torch.randn(14 * 14 + 1, 16)
    out = interpolate_positional_embedding(pos, 14, 14)
    assert not torch.allclose(out[1:], pos[1:], atol=1e-3)
    grid = pos[1:].reshape(1, 14, 14, 16).permute(0, 3, 1, 2)
    # the sampling position of output pixel 13 is (13.5) * 14 / 14.1 - 0.5, computed independently
    src = 13.5 * 14 / 14.1 - 0.5
    assert src < 13 - 1e-3
    by_size = F.interpolate(grid, size=(14, 14), mode="bicubic", align_corners=False)
    assert torch.allclose(by_size.permute(0, 2, 3, 1).reshape(196, 16), pos[1:], atol=1e-5)


def test_sine_positional_encoding_values() -> None:
    pos = sine_positional_encoding(2, 8, 3, 5)  # 4 y channels then 4 x channels
    assert pos.shape == (2, 8, 3, 5)
    i, j = 1, 3
    y = (i + 1) / (3 + 1e-6) * 2 * math.pi
    x = (j + 1) / (5 + 1e-6) * 2 * math.pi
    d2 = 10000 ** (2 / 4)
    expected = [math.sin(y), math.cos(y), math.sin(y / d2), math.cos(y / d2),
                math.sin(x), math.cos(x), math.sin(x / d2), math.cos(x / d2)]
    assert torch.allclose(pos[1, :, i, j], torch.tensor(expected), atol=1e-6)


def test_decode_matches_torch_post_norm_decoder_without_positions(tiny_state) -> None:
    # with zero query/memory positions the official layer is torch's post-norm TransformerDecoderLayer
    d, heads = 48, 2
    state = dict(tiny_state)
    state["query_embed"] = torch.zeros_like(state["query_embed"])
    memory = torch.randn(20, 3, d)
    ours = decode(state, memory, torch.zeros_like(memory), heads)
    layer = nn.TransformerDecoderLayer(d, heads, dim_feedforward=64, dropout=0.0, activation="relu", norm_first=False)
    torch_dec = nn.TransformerDecoder(layer, num_layers=2, norm=nn.LayerNorm(d)).eval()
    torch_dec.load_state_dict({k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")})
    with torch.no_grad():
        expected = torch_dec(torch.zeros(10, 3, d), memory)
    assert ours.shape == (2, 10, 3, d)
    assert torch.allclose(ours[-1], expected, atol=1e-5)


def test_official_forward_shapes_and_ranges(tiny_state) -> None:
    images = torch.randn(2, 3, 64, 52)  # 52 is not a multiple of 8: the remainder is dropped
    out = official_forward(tiny_state, TINY_VIT, images, dec_heads=2)
    assert out["mask_proposals"].shape == (2, 2, 10, 16, 12)
    assert out["patch_tokens"].shape == (2, 16, 12, 32)
    probs = out["mask_proposals"]
    assert probs.min() >= 0 and probs.max() <= 1
    assert (probs > 0.5).any() and (probs < 0.5).any()  # the random weights give non-degenerate masks
    assert torch.allclose(out["patch_tokens"].norm(dim=-1), torch.ones(2, 16, 12), atol=1e-5)


def test_official_forward_is_per_image(tiny_state) -> None:
    images = torch.randn(2, 3, 32, 40)
    both = official_forward(tiny_state, TINY_VIT, images, dec_heads=2)
    one = official_forward(tiny_state, TINY_VIT, images[1:], dec_heads=2)
    for k in both:
        assert torch.allclose(both[k][1:], one[k], atol=1e-5)


def test_patch_tokens_subtract_one_scalar_mean_per_image(tiny_state) -> None:
    # §1.9: LayerNorm over (h', w', E) then per-pixel L2 == (U - mean(U)) / |U - mean(U)|
    images = torch.randn(1, 3, 64, 64)
    out = official_forward(tiny_state, TINY_VIT, images, dec_heads=2)["patch_tokens"]
    tokens, h, w = encode_image(tiny_state, TINY_VIT, images)
    up = F.interpolate(tokens.reshape(1, h, w, 48).permute(0, 3, 1, 2), scale_factor=2, mode="bilinear")
    u = up.permute(0, 2, 3, 1) @ tiny_state["encoder.proj"]
    expected = (u - u.mean()) / (u - u.mean()).norm(dim=-1, keepdim=True)
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.slow  # importing open_clip and its BPE vocabulary takes a few seconds
def test_encode_text_matches_open_clip_text_tower() -> None:
    import open_clip

    cfg = {"embed_dim": 16, "quick_gelu": True,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
           "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=12)(["person", "sports ball", "Yellow duck"])
    with torch.no_grad():
        expected = F.normalize(model.encode_text(tokens), dim=-1)
    state = {k: v for k, v in model.state_dict().items() if k != "attn_mask"}
    assert torch.allclose(encode_text(state, tokens, heads=2), expected, atol=1e-5)


def test_semantic_prediction_argmax_after_upsampling() -> None:
    tokens = F.normalize(torch.randn(1, 4, 6, 8), dim=-1)
    text = F.normalize(torch.randn(3, 8), dim=-1)
    low = semantic_prediction(tokens, text, None)
    assert low.shape == (1, 4, 6)
    assert torch.equal(low[0], (tokens[0] @ text.t()).argmax(-1))
    full = semantic_prediction(tokens, text, (8, 12))
    assert full.shape == (1, 8, 12) and full.dtype == torch.int64
    # exact 2x bilinear (align_corners=False): corner output pixels sample the clamped corner input pixels
    for (i, j), (y, x) in {(0, 0): (0, 0), (0, 5): (0, 11), (3, 0): (7, 0), (3, 5): (7, 11)}.items():
        assert full[0, y, x] == low[0, i, j]


def _disk(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_hard_nms_hand_made_case() -> None:
    h = w = 20
    a = _disk(h, w, 5, 5, 4)
    b = _disk(h, w, 5, 6, 4)  # IoU with a well above 0.3
    c = _disk(h, w, 15, 15, 3)  # disjoint from a
    d = _disk(h, w, 15, 4, 3)
    e = np.zeros((h, w), bool)
    masks = np.stack([a, b, c, d, e, a])
    scores = np.array([0.9, 0.8, 0.0005, 0.0001, 0.5, 0.99], np.float32)
    categories = np.array([1, 1, 1, 2, 3, 0])
    kept = hard_nms(masks, scores, categories)
    # b suppressed by a; c falls under the 0.001 floor after the first round; d is alone in its class and is
    # kept whatever its score; the empty mask e is dropped; background (query 5) is never considered
    assert [(q, cat) for q, cat, _ in kept] == [(0, 1), (3, 2)]
    assert kept[0][2] == pytest.approx(0.9) and kept[1][2] == pytest.approx(0.0001)
    # at an IoU threshold above IoU(a, b), b survives
    kept = hard_nms(masks, scores, categories, iou_threshold=0.95)
    assert [(q, cat) for q, cat, _ in kept] == [(0, 1), (1, 1), (3, 2)]


def test_instance_prediction_scores_and_background_for_empty_masks() -> None:
    h, w = 4, 4
    probs = torch.full((1, 3, h, w), 0.1)
    probs[0, 0, :2, :2] = 0.8  # query 0: top-left block, mean probability 0.8
    probs[0, 1, 2:, 2:] = 0.6  # query 1: bottom-right block
    # query 2: empty (all below threshold)
    tokens = torch.zeros(1, h, w, 2)
    tokens[..., 0] = 1.0
    tokens[0, 2:, 2:] = torch.tensor([0.0, 1.0])
    text = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])  # background, class 1, class 2
    out = instance_prediction(probs, tokens, text, size=None)[0]
    got = {d["query"]: d for d in out}
    assert set(got) == {0, 1}
    assert got[0]["label"] == 1 and got[1]["label"] == 2
    assert got[0]["score"] == pytest.approx(0.8 * 1 / (1 + math.exp(-5.0)), rel=1e-5)
    assert got[1]["score"] == pytest.approx(0.6 * 1 / (1 + math.exp(-5.0)), rel=1e-5)
    assert got[0]["bbox"] == [0.0, 0.0, 1.0, 1.0] and got[1]["bbox"] == [2.0, 2.0, 3.0, 3.0]
    assert got[0]["mask"].sum() == 4 and got[0]["image_size"] == (4, 4)


def test_instance_prediction_maps_coco_ids() -> None:
    probs = torch.full((1, 1, 2, 2), 0.9)
    tokens = torch.zeros(1, 2, 2, 2)
    tokens[..., 1] = 1.0
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = instance_prediction(probs, tokens, text, size=(5, 7), id_map={0: 0, 1: 13})[0]
    assert [(d["label"], d["category_id"]) for d in out] == [(1, 13)]
    assert out[0]["mask"].shape == (5, 7) and out[0]["mask"].all()


def test_predict_on_tiny_forward(tiny_state) -> None:
    images = torch.randn(1, 3, 48, 64)
    out = official_forward(tiny_state, TINY_VIT, images, dec_heads=2)
    text = F.normalize(torch.randn(6, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    pred = predict(out, text, (48, 64))
    assert pred["semantic"].shape == (1, 48, 64)
    assert pred["instances"][0], "random weights should give at least one instance"
    for inst in pred["instances"][0]:
        assert inst["label"] != 0 and inst["mask"].shape == (48, 64) and inst["mask"].any()
