import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from tests.model.conftest import make_tiny_checkpoint


def test_checkpoint_round_trip_exact(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "a.safetensors", seed=3)
    loaded = load_checkpoint(path)
    again = tmp_path / "b.safetensors"
    save_checkpoint(again, loaded.model, loaded.text_encoder.tower, loaded.metadata)
    a, b = load_file(str(path)), load_file(str(again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.metadata.vocabulary == ["background", "cat", "dog"]
    assert loaded.metadata.provenance == {"made_by": "tests"}
    assert loaded.checkpoint_id == f"tiny-test@{loaded.sha256[:12]}"
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_fp16_storage_loads_as_float32(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "a.safetensors")
    loaded = load_checkpoint(path)
    half = tmp_path / "half.safetensors"
    save_checkpoint(half, loaded.model, loaded.text_encoder.tower, loaded.metadata, dtype=torch.float16)
    assert half.stat().st_size < 0.6 * path.stat().st_size
    back = load_checkpoint(half)
    p = back.model.query_embed
    assert p.dtype == torch.float32
    assert torch.allclose(p, loaded.model.query_embed, atol=1e-2)


def test_checkpoint_missing_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_checkpoint_rejects_foreign_and_mismatched_files(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a zutis checkpoint"):
        read_metadata(foreign)
    path = make_tiny_checkpoint(tmp_path / "a.safetensors")
    tensors = load_file(str(path))
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    del tensors["zutis.query_embed"]
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=meta)
    with pytest.raises(ValueError, match="query_embed"):
        load_checkpoint(broken)
    meta = dict(meta, model_config=json.dumps({"clip_model": None}))
    save_file(load_file(str(path)), str(broken), metadata=meta)
    with pytest.raises(ValueError, match="malformed checkpoint metadata"):
        read_metadata(broken)
