"""Config files that extend another: deep merge, removals, bases by name or relative path, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.training.config import load_config
from model.training.config_files import SHIPPED_CONFIGS, deep_merge, read_config
from model.training.shapes.clip_recipe import ClipRecipe


def _write(path: Path, d: dict) -> Path:
    path.write_text(json.dumps(d))
    return path


def test_deep_merge_merges_objects_and_replaces_everything_else():
    base = {"a": {"x": 1, "y": [1, 2], "z": {"p": 1}}, "b": 2, "c": None}
    out = deep_merge(base, {"a": {"y": [3], "z": {"q": 2}}, "c": 1.5, "d": None})
    assert out == {"a": {"x": 1, "y": [3], "z": {"p": 1, "q": 2}}, "b": 2, "c": 1.5, "d": None}
    assert base == {"a": {"x": 1, "y": [1, 2], "z": {"p": 1}}, "b": 2, "c": None}  # untouched


def test_a_shipped_name_a_chain_and_removals_resolve(tmp_path):
    shipped = json.loads((SHIPPED_CONFIGS / "shapes.json").read_text())
    first = _write(tmp_path / "first.json", {"extends": "shapes", "remove": ["inference.temperature", "data"],
                                             "optim": {"seed": 7}, "model": {"mask_stop_gradient": False}})
    (tmp_path / "sub").mkdir()
    second = _write(tmp_path / "sub" / "second.json", {"extends": "../first.json", "optim": {"steps": 5}})
    got = read_config(second)
    want = json.loads(json.dumps(shipped))
    del want["inference"]["temperature"], want["data"]
    want["optim"].update(seed=7, steps=5)
    want["model"]["mask_stop_gradient"] = False
    assert got == want
    cfg = load_config(second)
    assert cfg.optim.steps == 5 and cfg.optim.seed == 7 and cfg.model.mask_stop_gradient is False
    assert cfg.synthesis == load_config(SHIPPED_CONFIGS / "shapes.json").synthesis
    assert read_config(SHIPPED_CONFIGS / "shapes.json") == shipped  # a file without extends is read as it is


def test_clip_recipes_extend_too(tmp_path):
    path = _write(tmp_path / "r.json", {"extends": "shapes_clip", "steps": 7, "cpu_amp": True,
                                        "model_config": {"clip_config": {"vision_cfg": {"image_size": 128}}}})
    recipe, shipped = ClipRecipe.load(path), ClipRecipe.load(SHIPPED_CONFIGS / "shapes_clip.json")
    assert recipe.steps == 7 and recipe.cpu_amp and recipe.image_size == 128 and shipped.image_size == 64
    assert recipe.model_config.clip_config["text_cfg"] == shipped.model_config.clip_config["text_cfg"]


def test_unknown_keys_are_still_rejected_with_the_file_named(tmp_path):
    typo = _write(tmp_path / "typo.json", {"extends": "shapes", "optim": {"stesp": 5}})
    with pytest.raises(ValueError, match=r"typo\.json.*unknown key\(s\) in optim: \['stesp'\]"):
        load_config(typo)
    section = _write(tmp_path / "section.json", {"extends": "shapes", "optimiser": {}})
    with pytest.raises(ValueError, match=r"section\.json.*'optimiser'"):
        load_config(section)
    recipe = _write(tmp_path / "recipe.json", {"extends": "shapes_clip", "bach_size": 3})
    with pytest.raises(ValueError, match=r"recipe\.json.*bach_size"):
        ClipRecipe.load(recipe)


def test_bad_extends_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.json.*extended by"):
        read_config(_write(tmp_path / "a.json", {"extends": "nope.json"}))
    with pytest.raises(FileNotFoundError, match="no_such_recipe"):
        read_config(_write(tmp_path / "b.json", {"extends": "no_such_recipe"}))
    _write(tmp_path / "c.json", {"extends": "d.json"})
    with pytest.raises(ValueError, match="cycle"):
        read_config(_write(tmp_path / "d.json", {"extends": "c.json"}))
    with pytest.raises(ValueError, match=r"'remove' names 'optim\.nothing'"):
        read_config(_write(tmp_path / "e.json", {"extends": "shapes", "remove": ["optim.nothing"]}))
    with pytest.raises(ValueError, match="'remove' needs 'extends'"):
        read_config(_write(tmp_path / "f.json", {"remove": ["optim"]}))
    with pytest.raises(ValueError, match="'extends' must name"):
        read_config(_write(tmp_path / "g.json", {"extends": 3}))
    with pytest.raises(ValueError, match="JSON object"):
        read_config(_write(tmp_path / "h.json", [1]))
