import pytest
import torch

from model.config import tiny_test_config
from model.text import TextEncoder, build_vocabulary, normalise_concept


def test_text_vocabulary_background_first_dedup_order_kept():
    assert build_vocabulary(["Cat", " red   umbrella ", "cat", "", "background", "dog"]) == [
        "background", "cat", "red umbrella", "dog"]


@pytest.mark.parametrize("bad", [[], ["", "  "], ["background"]])
def test_text_vocabulary_rejects_empty(bad):
    with pytest.raises(ValueError, match="no concepts"):
        build_vocabulary(bad)


def test_text_normalise_concept():
    assert normalise_concept("  Red\tUmbrella ") == "red umbrella"


def test_text_encoder_unit_norm_and_template_ensembling():
    torch.manual_seed(0)
    enc = TextEncoder(tiny_test_config()).eval()
    raw = enc.encode(["cat", "dog"])
    assert raw.shape == (2, 32)
    assert torch.allclose(raw.norm(dim=-1), torch.ones(2), atol=1e-6)
    templates = ["a photo of a {}.", "a {} in the scene."]
    ens = enc.encode(["cat", "dog"], templates)
    # independent computation of the ensemble
    each = enc.encode([t.format(c) for c in ["cat", "dog"] for t in templates]).reshape(2, 2, -1)
    expected = each.mean(1)
    expected = expected / expected.norm(dim=-1, keepdim=True)
    assert torch.allclose(ens, expected, atol=1e-6)
    assert not torch.allclose(ens, raw)
