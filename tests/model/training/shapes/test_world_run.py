"""A run from nothing: the ``world`` section's cached stages (model.training.stages.prepare_world), how they fill
in a training config (model.training.config.with_world), and a tiny end-to-end ``python -m model.train`` on the
shapes world."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from model.config import tiny_test_config
from model.training.shapes.clip_recipe import ClipRecipe
from model.training.shapes.world import ShapesWorld
from model.training.stages import WorldConfig, prepare_world
from model.train import main
from model.training.config import TrainConfig, with_world
from model.training.config_files import read_config

WORLD = ShapesWorld()
MODEL = tiny_test_config(conv_stem=(8, 16))
SHIPPED = Path(__file__).resolve().parents[4] / "model" / "configs"
EXPERIMENTS = Path(__file__).resolve().parents[4] / "experiments" / "shapes" / "configs"


@pytest.fixture(autouse=True)
def _restore_global_torch_state():
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    yield
    torch.set_flush_denormal(False)
    torch.set_rng_state(rng)
    torch.set_num_threads(threads)


def _recipe(tmp_path: Path) -> Path:
    recipe = ClipRecipe(model_config=MODEL, batch_size=8, steps=2, warmup_steps=1, eval_every=2, eval_per_concept=1,
                        final_eval_per_concept=1, threads=1, seed=0)
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe.to_dict()))
    return path


def _world(tmp_path: Path, **changes) -> dict:
    world = dict(clip_recipe=str(_recipe(tmp_path)), index_images=48, val_scenes=3, test_scenes=4, scene_size=64)
    world.update(changes)
    return world


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, WorldConfig]:
    """A tiny world built once: (cache directory, its config)."""
    root = tmp_path_factory.mktemp("world")
    cfg = WorldConfig(**_world(root))
    prepare_world(cfg, root / "cache", log=lambda m: None)
    return root, cfg


@pytest.mark.slow
def test_world_stages_are_built_once_and_keyed_by_their_inputs(built):
    root, cfg = built
    logs: list[str] = []
    first = prepare_world(cfg, root / "cache", log=logs.append)
    assert first.clip_weights.is_file() and len(list(first.index_images.glob("*.png"))) == 48
    assert first.index_truth.is_file()
    for split, n in ((first.val_dir, 3), (first.test_dir, 4)):
        assert len(json.loads((split / "instances.json").read_text())["images"]) == n
        assert len(list((split / "labels").glob("*.png"))) == n
    # val and test scenes come from different seeds: no shared image
    val = {p.read_bytes() for p in (first.val_dir / "images").glob("*.png")}
    assert not val & {p.read_bytes() for p in (first.test_dir / "images").glob("*.png")}

    assert sum("cached" in m for m in logs) == 4  # nothing rebuilt
    more = prepare_world(WorldConfig(**_world(root, test_scenes=5)), root / "cache", log=lambda m: None)
    assert more.test_dir != first.test_dir and more.clip_weights == first.clip_weights

    # a finished CLIP file (the shipped one, in real use) replaces the pre-training stage; the rest is shared
    logs.clear()
    given = prepare_world(WorldConfig(**_world(root, clip_recipe=None, clip_weights=str(first.clip_weights))),
                          root / "cache", log=logs.append)
    assert given == first and sum("cached" in m for m in logs) == 3


def test_index_uses_the_normalisation_its_clip_was_trained_with(tmp_path):
    from model.backbone import build_text_tower, build_vision_tower
    from model.clip_weights import ClipTowers, save_clip
    from model.config import CLIP_MEAN, CLIP_STD
    from model.training.stages import clip_normalisation

    config = tiny_test_config(image_mean=(0.1, 0.2, 0.3), image_std=(0.5, 0.6, 0.7))
    save_clip(tmp_path / "ours.safetensors", ClipTowers(config, build_vision_tower(config), build_text_tower(config)))
    assert clip_normalisation(tmp_path / "ours.safetensors") == ((0.1, 0.2, 0.3), (0.5, 0.6, 0.7))
    (tmp_path / "openai.pt").write_bytes(b"")
    assert clip_normalisation(tmp_path / "openai.pt") == (CLIP_MEAN, CLIP_STD)


def test_world_section_validation_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="clip_recipe"):
        WorldConfig(clip_recipe=str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="clip_weights: file not found: .*gone.safetensors"):
        WorldConfig(clip_weights=str(tmp_path / "gone.safetensors"))
    with pytest.raises(ValueError, match="exactly one of clip_recipe"):
        WorldConfig(**_world(tmp_path, clip_weights=str(tmp_path / "recipe.json")))
    with pytest.raises(ValueError, match="exactly one of clip_recipe"):
        WorldConfig()
    with pytest.raises(ValueError, match="masks"):
        WorldConfig(**_world(tmp_path, masks="oracle"))
    with pytest.raises(ValueError, match="unknown key"):
        TrainConfig.from_dict({"model": MODEL.to_dict(), "world": _world(tmp_path, colours=3)})
    with pytest.raises(ValueError, match="clip_weights"):
        TrainConfig.from_dict({"model": MODEL.to_dict(), "vocabulary": ["red circle"]})


@pytest.mark.slow
def test_world_config_trains_on_seen_exports_all_and_evaluates_both(built):
    root, _ = built
    cfg = TrainConfig.from_dict({"model": MODEL.to_dict(), "world": _world(root, masks="truth"),
                                 "eval": {"score_threshold": 0.001}})
    assert list(cfg.vocabulary) == [WORLD.concept_name(i) for i in WORLD.seen_ids] and len(cfg.vocabulary) == 48
    assert cfg.export_vocabulary == WORLD.concepts
    world = prepare_world(cfg.world, root / "cache", log=lambda m: None)
    resolved = with_world(cfg, world)
    assert resolved.clip_weights == str(world.clip_weights)
    assert resolved.data.index_dirs == (str(world.index_images),)
    assert resolved.data.ground_truth == {"annotations": str(world.index_truth),
                                          "image_dir": str(world.index_images.resolve())}
    assert resolved.eval.annotations == str(world.test_dir / "instances.json")
    assert resolved.eval.score_threshold == 0.001
    assert resolved.val.annotations == str(world.val_dir / "instances.json") and resolved.val.subsets is None
    assert set(resolved.eval.subsets) == {"seen", "unseen"}
    assert sorted(resolved.eval.subsets["unseen"]) == sorted(WORLD.concept_name(i) for i in WORLD.unseen_ids)


def _differing_sections(a: dict, b: dict) -> set[str]:
    return {k for k in set(a) | set(b) if a.get(k) != b.get(k)} - {"description", "out_dir", "export_path"}


def test_shipped_shapes_configs_parse_and_differ_only_where_named():
    main_cfg = json.loads((SHIPPED / "shapes.json").read_text())
    cfg = TrainConfig.from_dict(main_cfg)
    clip = json.loads((SHIPPED / "shapes_clip.json").read_text())
    # the ZUTIS encoder is initialised from the world's CLIP, so the architectures must agree
    assert cfg.model.open_clip_config() == TrainConfig.from_dict(
        {**main_cfg, "model": clip["model_config"]}).model.open_clip_config()
    assert cfg.model.input_size == cfg.world.scene_size and cfg.export_dtype == "float16"
    assert cfg.world.train_split == "seen" and cfg.world.masks == "pseudo" and cfg.synthesis.copy_paste
    assert cfg.export_path == "weights/zutis-shapes.safetensors"
    # R3 starts from the shipped CLIP (rung R1), which its own command reproduces
    assert cfg.world.clip_weights == "weights/zutis-shapes-clip.safetensors" and cfg.world.clip_recipe is None
    assert "model/configs/shapes_clip.json" in clip["description"] and clip["steps"] and clip["dense_weight"] > 0
    # the ladder's rungs and the shipped recipe's ablations each differ from it only where named
    for name, changed in (("r2_oracle.json", {"world"}), ("r3_no_copy_paste.json", {"synthesis"}),
                          ("r3_seed1.json", {"optim"}), ("r3_grad.json", {"model"})):
        variant = read_config(EXPERIMENTS / name)
        assert _differing_sections(main_cfg, variant) == changed, name
        TrainConfig.from_dict(variant)
    grad = read_config(EXPERIMENTS / "r3_grad.json")["model"]
    assert {k for k in set(grad) | set(main_cfg["model"]) if grad.get(k) != main_cfg["model"].get(k)} == \
        {"mask_stop_gradient"}
    # the R1 lever study: the shipped CLIP recipe at 64 and 128 px on an equal wall-clock budget
    for size in (64, 128):
        lever = read_config(EXPERIMENTS / f"r1_{size}px_20min.json")
        resized = {"model_config"} if size != clip["model_config"]["clip_config"]["vision_cfg"]["image_size"] else set()
        assert _differing_sections(clip, lever) == {"steps", "minutes", "threads"} | resized, size
        assert lever["model_config"]["clip_config"]["vision_cfg"]["image_size"] == size and lever["minutes"] == 20
        ClipRecipe.from_dict(lever)
    oracle = TrainConfig.from_dict(read_config(EXPERIMENTS / "r2_oracle.json"))
    assert oracle.world == dataclasses.replace(cfg.world, masks="truth")


@pytest.mark.slow
def test_one_command_goes_from_nothing_to_a_service_checkpoint(built, tmp_path):
    from model.checkpoint import read_metadata

    root, _ = built  # the same world (its stages are cached): this test times the rest of the chain
    config = {"model": MODEL.to_dict(), "world": _world(root), "cache_dir": str(root / "cache"),
              "data": {"retrieval_n": 2, "pseudo_masks": {"extractors": ["colour"], "max_tokens": 256, "n_init": 1}},
              "synthesis": {"max_objects": 2, "grayscale_prob": 0.0},
              "optim": {"steps": 2, "batch_size": 2, "num_workers": 0, "log_every": 1, "checkpoint_every": 2},
              "eval": {"score_threshold": 0.001}, "inference": {"temperature": 2.0},
              "export_path": str(tmp_path / "weights" / "zutis-shapes.safetensors"), "export_dtype": "float16",
              "out_dir": str(tmp_path / "run")}
    path = tmp_path / "shapes.json"
    path.write_text(json.dumps(config))
    assert main(["--config", str(path), "--device", "cpu"]) == 0

    meta = read_metadata(tmp_path / "weights" / "zutis-shapes.safetensors")
    assert meta.model_id == "zutis-shapes" and meta.vocabulary == ["background", *WORLD.concepts]
    assert meta.inference.temperature == 2.0
    chosen = meta.provenance["score_threshold"]
    assert meta.inference.score_threshold == chosen["chosen"] and chosen["val_images"] == 3
    assert len(chosen["points"]) == 19
    metrics = meta.provenance["metrics"]
    assert metrics["num_images"] == 4 and set(metrics["subsets"]) == {"seen", "unseen"}
    assert metrics["operating_point"]["score_threshold"] == chosen["chosen"]
    assert set(meta.provenance["timings_seconds"]) >= {"world", "data", "train", "choose_threshold", "evaluate"}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "weights" / "zutis-shapes.safetensors"), framework="pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert torch.float16 in dtypes and torch.float32 not in dtypes
