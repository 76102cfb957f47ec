import pytest
import torch

from model.checkpoint import CheckpointMetadata, save_checkpoint
from model.config import InferenceParams, tiny_test_config
from model.network import ZUTIS
from model.text import TextEncoder


def make_tiny_checkpoint(path, seed: int = 0, **metadata_overrides):
    """A randomly initialised tiny checkpoint (a real file in our format)."""
    torch.manual_seed(seed)
    cfg = tiny_test_config()
    model, text = ZUTIS(cfg), TextEncoder(cfg)
    meta = dict(model_id="tiny-test", model_config=cfg, vocabulary=["background", "cat", "dog"],
                inference=InferenceParams(score_threshold=0.0), provenance={"made_by": "tests"})
    meta.update(metadata_overrides)
    save_checkpoint(path, model, text.tower, CheckpointMetadata(**meta))
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")
