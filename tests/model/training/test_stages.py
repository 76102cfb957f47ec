"""Data stages: content-keyed caching, atomic completion, input validation, and the chain on a tiny index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import tiny_test_config
from model.checkpoint import file_sha256
from model.training.files import folder_fingerprint
from model.training.stage_cache import run_stage, stage_dir
from model.training.stages import DataConfig, prepare_training_data, validate_data_inputs


def test_run_stage_builds_once_per_content_key(tmp_path):
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "result.txt").write_text("x")

    a = run_stage(tmp_path, "s", {"n": 1}, build, log=lambda m: None)
    again = run_stage(tmp_path, "s", {"n": 1}, build, log=lambda m: None)
    other = run_stage(tmp_path, "s", {"n": 2}, build, log=lambda m: None)
    assert a == again != other and len(calls) == 2
    assert (a / "result.txt").read_text() == "x" and json.loads((a / "inputs.json").read_text()) == {"n": 1}
    assert a == stage_dir(tmp_path, "s", {"n": 1})


def test_interrupted_stage_is_never_taken_as_finished(tmp_path):
    def crash(out: Path) -> None:
        (out / "partial.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path, "s", {"n": 1}, crash, log=lambda m: None)
    assert not stage_dir(tmp_path, "s", {"n": 1}).exists()
    done = run_stage(tmp_path, "s", {"n": 1}, lambda out: (out / "ok").write_text("1"), log=lambda m: None)
    assert (done / "ok").exists() and not (done / "partial.txt").exists()


def test_fingerprints_follow_content_and_listing(tmp_path):
    (tmp_path / "d").mkdir()
    f = tmp_path / "d" / "a.png"
    f.write_bytes(b"1")
    digest, listing = file_sha256(f), folder_fingerprint(tmp_path / "d")
    f.write_bytes(b"22")
    assert file_sha256(f) != digest and folder_fingerprint(tmp_path / "d") != listing
    (tmp_path / "d" / "notes.txt").write_text("not an image")
    assert folder_fingerprint(tmp_path / "d") == folder_fingerprint(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="nope"):
        folder_fingerprint(tmp_path / "nope")


def test_validate_data_inputs_names_what_is_missing(tmp_path):
    clip = tmp_path / "clip.safetensors"
    clip.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="/no/images"):
        validate_data_inputs(DataConfig(index_dirs=("/no/images",)), str(clip))
    with pytest.raises(ValueError, match="retrieval_file or data.index_dirs"):
        validate_data_inputs(DataConfig(), str(clip))
    with pytest.raises(ValueError, match="dino_weights"):
        validate_data_inputs(DataConfig(index_dirs=(str(tmp_path),), pseudo_masks={"extractors": ["dino"]}), str(clip))
    with pytest.raises(FileNotFoundError, match="/no/dino.pth"):
        validate_data_inputs(DataConfig(index_dirs=(str(tmp_path),), pseudo_masks={"extractors": ["dino"],
                                                                                   "dino_weights": "/no/dino.pth"}),
                             str(clip))
    with pytest.raises(ValueError, match="extractor"):
        DataConfig(pseudo_masks={"extractor": ["colour"]})


@pytest.mark.slow
def test_index_and_retrieval_stages_are_cached_and_keyed(tmp_path):
    images, clip, cfg = _tiny_index(tmp_path)
    gt = {"images": [{"id": i, "file_name": f"{i}.png", "height": 40, "width": 50} for i in range(2)],
          "categories": [{"id": 1, "name": "cat"}], "annotations": [
              {"id": 1, "image_id": 0, "category_id": 1, "segmentation": [[1.0, 1.0, 20.0, 1.0, 20.0, 20.0]]}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    data = DataConfig(index_dirs=(str(images),), retrieval_n=2, retrieval_templates=False,
                      ground_truth={"annotations": str(tmp_path / "gt.json"), "image_dir": str(images)})
    logs: list[str] = []
    args = (["cat", "dog"], str(clip), cfg, tmp_path / "cache", torch.device("cpu"))
    first = prepare_training_data(data, *args, log=logs.append)
    raw = json.loads((Path(first.provenance["retrieval_stage"]) / "retrieval.json").read_text())
    assert [len(v) for v in raw.values()] == [2, 2]
    annotated = {str(images / "0.png"), str(images / "1.png")}  # images 2-4 have no ground truth: left out
    assert first.retrieval == {c: [p for p in raw[c] if p in annotated] for c in ("cat", "dog")}
    assert first.provenance["images_without_mask"] == len({p for v in raw.values() for p in v} - annotated)
    assert any("building" in m and "index-" in m for m in logs)
    logs.clear()
    second = prepare_training_data(data, *args, log=logs.append)
    assert second.retrieval == first.retrieval
    assert sum("cached" in m for m in logs) == 2 and not any("building" in m for m in logs)
    logs.clear()
    prepare_training_data(DataConfig(**{**data.__dict__, "retrieval_n": 3}), *args, log=logs.append)
    assert any("index" in m and "cached" in m for m in logs) and any("retrieval" in m and "building" in m for m in logs)


def _tiny_index(tmp_path: Path) -> tuple[Path, Path, object]:
    """Five random images and a random tiny CLIP file; returns (image folder, CLIP file, its ModelConfig)."""
    from model.backbone import build_text_tower, build_vision_tower
    from model.clip_weights import ClipTowers, save_clip

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(images / f"{i}.png")
    cfg = tiny_test_config()
    torch.manual_seed(0)
    clip = tmp_path / "clip.safetensors"
    save_clip(clip, ClipTowers(cfg, build_vision_tower(cfg), build_text_tower(cfg)))
    return images, clip, cfg


def _keys(data: DataConfig, clip: Path, cfg, paths=("a.png", "b.png")) -> tuple[str, str, str]:
    from model.training.stage_cache import stage_key
    from model.training.stages import index_stage_inputs, pseudo_mask_stage_inputs, retrieval_stage_inputs

    index = index_stage_inputs(data, str(clip), cfg)
    return (stage_key(index), stage_key(retrieval_stage_inputs(data, ["cat", "dog"], index)),
            stage_key(pseudo_mask_stage_inputs(data, list(paths), str(clip), cfg)))


def test_clip_stages_key_on_the_clips_own_fields_not_the_zutis_head(tmp_path):
    images, clip, cfg = _tiny_index(tmp_path)
    data = DataConfig(index_dirs=(str(images),), retrieval_n=2, pseudo_masks={"extractors": ["clip"]})
    base = _keys(data, clip, cfg)
    # decoder / head / input options of the ZUTIS model: none of the three CLIP stages reads them
    for change in ({"num_queries": 5}, {"decoder_layers": 3, "decoder_heads": 4, "decoder_ffn_dim": 32},
                   {"ffn_hidden_dim": 8}, {"mask_position": "sine"}, {"mask_stop_gradient": False},
                   {"input_size": 128}, {"image_mean": (0.5, 0.5, 0.5), "image_std": (0.2, 0.2, 0.2)}):
        assert _keys(data, clip, tiny_test_config(**change)) == base, change
    # the CLIP's own fields: every stage that reads the CLIP follows them
    wider = json.loads(json.dumps(cfg.clip_config))
    wider["vision_cfg"]["width"] = 64
    for change in ({"clip_config": wider}, {"conv_stem": (8, 16)}):
        keys = _keys(data, clip, tiny_test_config(**change))
        assert keys[0] != base[0] and keys[1] != base[1] and keys[2] != base[2], change
    # each stage's own inputs
    more = _keys(DataConfig(**{**data.__dict__, "retrieval_n": 3}), clip, cfg)
    assert more[0] == base[0] and more[1] != base[1] and more[2] == base[2]
    opts = _keys(DataConfig(**{**data.__dict__, "pseudo_masks": {"extractors": ["clip"], "n_init": 2}}), clip, cfg)
    assert opts[:2] == base[:2] and opts[2] != base[2]
    assert _keys(data, clip, cfg, paths=("a.png",))[2] != base[2]
    # colour pseudo-masks never read the CLIP: their key ignores it entirely
    colour = DataConfig(index_dirs=(str(images),), retrieval_n=2)
    assert _keys(colour, clip, cfg)[2] == _keys(colour, clip, tiny_test_config(clip_config=wider))[2]


def test_a_head_only_change_reuses_all_three_stages_and_old_keys_are_adopted(tmp_path):
    from model.training.stages import index_stage_inputs, pseudo_mask_stage_inputs, retrieval_stage_inputs

    images, clip, cfg = _tiny_index(tmp_path)
    data = DataConfig(index_dirs=(str(images),), retrieval_n=2, retrieval_templates=False,
                      pseudo_masks={"extractors": ["clip"], "n_init": 1})
    cache = tmp_path / "cache"
    logs: list[str] = []
    first = prepare_training_data(data, ["cat", "dog"], str(clip), cfg, cache, torch.device("cpu"), log=logs.append)
    assert sum("building" in m for m in logs) == 3
    logs.clear()
    head_only = tiny_test_config(num_queries=5, mask_stop_gradient=False, decoder_layers=1)
    second = prepare_training_data(data, ["cat", "dog"], str(clip), head_only, cache, torch.device("cpu"),
                                   log=logs.append)
    assert sum("cached" in m for m in logs) == 3 and not any("building" in m for m in logs), logs
    assert second.retrieval == first.retrieval and second.annotations.keys() == first.annotations.keys()

    # A cache written under the old keys (the whole ModelConfig): rename each stage folder to its old name.
    paths = sorted({p for ps in first.retrieval.values() for p in ps})
    index = index_stage_inputs(data, str(clip), head_only)
    old_index = {**index, "clip_model": head_only.to_dict()}  # what the key held before: the whole ModelConfig
    masks = pseudo_mask_stage_inputs(data, paths, str(clip), head_only)
    pairs = [("index", index, old_index),
             ("retrieval", retrieval_stage_inputs(data, ["cat", "dog"], index),
              retrieval_stage_inputs(data, ["cat", "dog"], old_index)),
             ("pseudo_masks", masks, {**masks, "clip_model": head_only.to_dict()})]
    for name, new, old in pairs:
        assert stage_dir(cache, name, new) != stage_dir(cache, name, old)
        stage_dir(cache, name, new).rename(stage_dir(cache, name, old))
    logs.clear()
    third = prepare_training_data(data, ["cat", "dog"], str(clip), head_only, cache, torch.device("cpu"),
                                  log=logs.append)
    assert sum("adopted" in m for m in logs) == 3 and not any("building" in m for m in logs), logs
    assert third.retrieval == first.retrieval
    for name, new, old in pairs:
        folder = stage_dir(cache, name, new)
        assert folder.is_dir() and not stage_dir(cache, name, old).exists()
        assert json.loads((folder / "inputs.json").read_text()) == json.loads(json.dumps(new, default=str))
        assert (folder / "adopted_from").read_text().strip() == stage_dir(cache, name, old).name


def test_run_stage_adopts_only_a_finished_legacy_directory(tmp_path):
    unfinished = stage_dir(tmp_path, "s", {"old": 1})
    unfinished.mkdir(parents=True)  # no DONE marker: an interrupted build under the old key
    built = run_stage(tmp_path, "s", {"new": 1}, lambda out: (out / "r").write_text("fresh"), log=lambda m: None,
                      legacy=[{"old": 1}])
    assert (built / "r").read_text() == "fresh" and not (built / "adopted_from").exists()
    old = run_stage(tmp_path, "s", {"old": 2}, lambda out: (out / "r").write_text("old"), log=lambda m: None)
    adopted = run_stage(tmp_path, "s", {"new": 2}, lambda out: pytest.fail("rebuilt"), log=lambda m: None,
                        legacy=[{"old": 2}])
    assert (adopted / "r").read_text() == "old" and not old.exists()
