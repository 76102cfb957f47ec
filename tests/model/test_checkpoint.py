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


def test_concept_split_stored_derived_or_unknown(tmp_path):
    from safetensors import safe_open

    stored = make_tiny_checkpoint(tmp_path / "stored.safetensors", trained_concepts=["cat"])
    split = read_metadata(stored).concept_split()
    assert (split.trained, split.evaluated_only, split.source) == (["cat"], ["dog"], "trained_concepts")
    with safe_open(str(stored), framework="pt") as f:
        assert json.loads(f.metadata()["trained_concepts"]) == ["cat"]
    # Files written before the field: the training configuration in the provenance says it.
    older = make_tiny_checkpoint(tmp_path / "older.safetensors", provenance={"config": {"vocabulary": ["dog"]}})
    split = read_metadata(older).concept_split()
    assert (split.trained, split.evaluated_only, split.source) == (["dog"], ["cat"], "provenance.config.vocabulary")
    unknown = make_tiny_checkpoint(tmp_path / "unknown.safetensors")
    assert read_metadata(unknown).concept_split() is None
    with safe_open(str(unknown), framework="pt") as f:
        assert "trained_concepts" not in f.metadata(), "files without the field stay as they were"


def test_shipped_checkpoint_trained_on_48_of_its_64_concepts():
    from tests.live_service import SHIPPED_CHECKPOINT

    metadata = read_metadata(SHIPPED_CHECKPOINT)
    split = metadata.concept_split()
    assert len(metadata.vocabulary) == 65 and len(split.trained) == 48 and len(split.evaluated_only) == 16
    # The same split the checkpoint's own evaluation reported as seen / unseen.
    subsets = metadata.provenance["config"]["eval"]["subsets"]
    assert sorted(split.trained) == sorted(subsets["seen"])
    assert sorted(split.evaluated_only) == sorted(subsets["unseen"])
    assert "green heart" in split.evaluated_only
