import pytest
import torch
import torch.nn.functional as F

from model.backbone import encode_patch_tokens
from model.config import ModelConfig, tiny_test_config
from model.network import ZUTIS


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ZUTIS(tiny_test_config()).eval()


def test_network_output_shapes_eval_and_train(tiny):
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        out = tiny(x)
    assert out.mask_probs.shape == (2, 10, 16, 20)
    assert out.semantic_features.shape == (2, 16, 20, 32)
    assert out.aux_mask_probs is None
    assert torch.allclose(out.semantic_features.norm(dim=-1), torch.ones(2, 16, 20), atol=1e-5)
    assert out.mask_probs.min() >= 0 and out.mask_probs.max() <= 1
    tiny.train()
    try:
        out = tiny(x)
    finally:
        tiny.eval()
    assert out.all_layer_mask_probs().shape == (2, 2, 10, 16, 20)


def test_network_trailing_pixels_dropped_like_official(tiny):
    x = torch.randn(1, 3, 70, 77)  # patch 8: 8 x 9 grid, the remainder pixels are ignored
    with torch.no_grad():
        a, b = tiny(x), tiny(x[..., :64, :72])
    assert torch.equal(a.mask_probs, b.mask_probs)


@pytest.mark.parametrize("size,batch", [(64, 6), (96, 3)])
def test_network_batched_equals_one_by_one_bitwise(tiny, size, batch):
    torch.manual_seed(1)
    x = torch.randn(batch, 3, size, size)
    valid = torch.randint(size // 2, size + 1, (batch, 2))
    with torch.no_grad():
        full = tiny(x, valid)
        for i in range(batch):
            one = tiny(x[i:i + 1], valid[i:i + 1])
            assert torch.equal(full.mask_probs[i], one.mask_probs[0])
            assert torch.equal(full.semantic_features[i], one.semantic_features[0])


def test_network_text_space_matches_official_layer_norm(tiny):
    """With no padding, the features equal F.layer_norm over (h', w', E) then per-pixel L2 (reference §1.9)."""
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = tiny(x)
        tokens, h, w = encode_patch_tokens(tiny.encoder, x)
        grid = F.interpolate(tokens.transpose(1, 2).reshape(3, -1, h, w), scale_factor=2, mode="bilinear")
        u = torch.einsum("bdhw,dc->bhwc", grid, tiny.encoder.proj)
        u = F.layer_norm(u, u.shape[1:])
        expected = u / (u.norm(dim=-1, keepdim=True) + 1e-7)
    assert (out.semantic_features - expected).abs().max() < 1e-5


def test_network_padding_excluded_from_text_space_statistics(tiny):
    """The layer-norm statistics ignore grid cells outside the valid region."""
    x = torch.randn(1, 3, 64, 64)
    valid = torch.tensor([[32, 64]])  # top half valid: grid rows 0..7 of 16
    with torch.no_grad():
        a = tiny(x, valid).semantic_features
        x2 = x.clone()
        x2[..., 40:, :] = 5.0  # change pixels whose patches lie entirely in the padding's rows
        tokens, h, w = encode_patch_tokens(tiny.encoder, x)
        grid = F.interpolate(tokens.transpose(1, 2).reshape(1, -1, h, w), scale_factor=2, mode="bilinear")
        u = torch.einsum("bdhw,dc->bhwc", grid, tiny.encoder.proj)[0]
        var, mean = torch.var_mean(u[:8], unbiased=False)
        expected = (u - mean) / torch.sqrt(var + 1e-5)
        expected = expected / (expected.norm(dim=-1, keepdim=True) + 1e-7)
    assert (a[0] - expected).abs().max() < 1e-5


def test_network_mask_branch_does_not_train_encoder():
    torch.manual_seed(0)
    net = ZUTIS(tiny_test_config()).train()
    out = net(torch.randn(1, 3, 64, 64))
    out.all_layer_mask_probs().sum().backward()
    assert all(p.grad is None for p in net.encoder.parameters())
    assert net.query_embed.grad is not None and net.ffn1.layers[0].weight.grad is not None


def test_network_official_state_dict_layout():
    net = ZUTIS(ModelConfig(clip_model="ViT-B-16"))
    sd = net.state_dict()
    assert len(sd) == 275
    assert sum(v.numel() for v in sd.values()) == 134_458_368
    assert list(sd)[0] == "query_embed" and sd["query_embed"].shape == (100, 768)
    assert sd["encoder.positional_embedding"].shape == (197, 768)
    assert sd["decoder.layers.5.multihead_attn.in_proj_weight"].shape == (2304, 768)
    assert sd["ffn2.layers.2.weight"].shape == (768, 256)


@pytest.mark.slow
@pytest.mark.parametrize("arch,grid", [("ViT-B-16", 48), ("ViT-B-32", 24)])
def test_network_vit_b_forward_384(arch, grid):
    net = ZUTIS(ModelConfig(clip_model=arch)).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 384, 384))
    assert out.mask_probs.shape == (1, 100, grid, grid)
    assert out.semantic_features.shape == (1, grid, grid, 512)
    assert torch.isfinite(out.semantic_features).all()
