import open_clip
import pytest
import torch

from benchmarks.fixtures import random_checkpoint
from model.config import InferenceParams, tiny_test_config
from model.convert_official import convert_official
from model.vocabularies import load_vocabulary
from tests.model.official_reference import (TINY, TINY_CLIP, encode_text, random_official_state_dict,
                                            random_openai_clip_state_dict)


def make_tiny_checkpoint(path, seed: int = 0, **metadata_overrides):
    """A randomly initialised tiny checkpoint (a real file in our format: ``benchmarks.fixtures.random_checkpoint``
    of the tiny test model)."""
    meta = dict(model_id="tiny-test", inference=InferenceParams(score_threshold=0.0), provenance={"made_by": "tests"})
    meta.update(metadata_overrides)
    return random_checkpoint(path, tiny_test_config(), seed=seed, **meta)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def tiny_official_conversion(root, command: str = "test") -> dict:
    """A tiny random official release (``TINY``, seed 0) and OpenAI CLIP file (``TINY_CLIP``, seed 1) written to
    ``root``, converted with ``model.convert_official`` (tiny config), and the independent reference's text
    embeddings of the COCO vocabulary: ``{"state", "clip", "zutis_path", "clip_path", "out", "text_ref"}``."""
    state = random_official_state_dict(**TINY, seed=0)
    clip = random_openai_clip_state_dict(**TINY_CLIP, seed=1)
    zutis_path, clip_path = root / "coco_vit_tiny.pt", root / "ViT-tiny.pt"
    torch.save(state, zutis_path)
    torch.save(clip, clip_path)
    out = convert_official(zutis_path, clip_path, "coco", root / "converted.safetensors",
                           model_config=tiny_test_config(), command=command)
    # open_clip only for its BPE tokenizer (the official code uses OpenAI's identical one)
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=16)(load_vocabulary("coco"))
    return {"state": state, "clip": clip, "zutis_path": zutis_path, "clip_path": clip_path, "out": out,
            "text_ref": encode_text(clip, tokens, heads=2)}
