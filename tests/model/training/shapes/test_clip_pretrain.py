"""Tiny-CLIP pre-training: the loss, the schedule, accuracy bookkeeping, the shipped recipe, and short real runs
whose files ``load_clip`` reads back."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.clip_weights import load_clip, save_clip
from model.config import tiny_test_config
from model.training.shapes.clip_losses import concept_targets, content_groups, contrastive_loss, dense_concept_loss
from model.training.shapes.clip_pretrain import build_clip, learning_rate, main, pretrain_clip, train_clip
from model.training.shapes.clip_recipe import ClipRecipe
from model.training.shapes.world import ShapesWorld

RECIPE_PATH = Path(__file__).resolve().parents[4] / "model" / "configs" / "shapes_clip.json"
WORLD = ShapesWorld()


def mini_recipe(**overrides) -> ClipRecipe:
    base = dict(model_config=tiny_test_config(conv_stem=(8, 16)), batch_size=8, steps=3, warmup_steps=1,
                eval_every=2, eval_per_concept=1, final_eval_per_concept=1, threads=1, seed=0)
    base.update(overrides)
    return ClipRecipe(**base)


# -- pieces ------------------------------------------------------------------------------------------------------

def test_contrastive_loss_with_distinct_groups_is_clip_loss() -> None:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 4, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 4, generator=g), dim=-1)
    scale = torch.tensor(math.log(10.0))
    logits = 10.0 * img @ txt.t()
    target = torch.arange(6)
    reference = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    torch.testing.assert_close(contrastive_loss(img, txt, scale, torch.arange(6)), reference)


def test_contrastive_loss_treats_equal_content_as_positives() -> None:
    # two identical pairs: the ideal answer splits probability between them, so swapping them changes nothing
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    txt = img.clone()
    scale = torch.tensor(0.0)  # logits are the cosine similarities
    loss = contrastive_loss(img, txt, scale, torch.tensor([0, 0, 1]))
    # rows 0 and 1: soft target (1/2, 1/2, 0) over logits (1, 1, 0); row 2: target (0, 0, 1) over (0, 0, 1);
    # the text direction is the same by symmetry
    expected = (2 * (math.log(2 * math.e + 1) - 1) + (math.log(2 + math.e) - 1)) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    swapped = contrastive_loss(img, txt[[1, 0, 2]], scale, torch.tensor([0, 0, 1]))
    assert float(swapped) == pytest.approx(float(loss), rel=1e-6)


def test_content_groups_are_equal_exactly_for_equal_contents() -> None:
    assert content_groups([(1,), (2, 5), (1,), (), (5, 2), ()]).tolist() == [0, 1, 0, 2, 3, 2]


def test_dense_concept_loss_matches_a_hand_computation() -> None:
    # 2 patches, 3 concepts; image 0 shows concepts 0 and 2, image 1 is clutter only (skipped)
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    concepts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [math.sqrt(0.5), math.sqrt(0.5)]])
    targets = torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.0, 0.0]])
    tau, scale = 2.0, torch.tensor(math.log(3.0))
    cos = [[1.0, 0.0, math.sqrt(0.5)], [0.0, 1.0, math.sqrt(0.5)]]  # [patch][concept] of image 0
    pooled = [(math.log(sum(math.exp(tau * cos[p][k]) for p in range(2))) - math.log(2)) / tau for k in range(3)]
    logits = [3.0 * v for v in pooled]
    log_z = math.log(sum(math.exp(v) for v in logits))
    expected = -(0.5 * (logits[0] - log_z) + 0.5 * (logits[2] - log_z))
    assert float(dense_concept_loss(tokens, concepts, targets, scale, tau)) == pytest.approx(expected, rel=1e-6)
    assert float(dense_concept_loss(tokens, concepts, torch.zeros(2, 3), scale, tau)) == 0.0


def test_dense_concept_loss_rewards_a_patch_that_matches_each_named_concept() -> None:
    concepts = torch.eye(3)
    targets = torch.tensor([[0.5, 0.5, 0.0]])
    both = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # one patch per named concept
    one = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])  # concept 1 is named but nowhere
    scale = torch.tensor(math.log(10.0))
    assert float(dense_concept_loss(both, concepts, targets, scale)) < float(dense_concept_loss(one, concepts,
                                                                                                 targets, scale))


def test_concept_targets_are_uniform_over_the_visible_concepts() -> None:
    t = concept_targets([(1, 3), (), (2, 2)], 4)
    assert t.tolist() == [[0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]


def test_learning_rate_warms_up_linearly_then_decays_to_zero() -> None:
    assert learning_rate(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert learning_rate(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert learning_rate(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert learning_rate(55, 100, 1.0, 10) == pytest.approx(0.5)
    assert learning_rate(100, 100, 1.0, 10) == pytest.approx(0.0, abs=1e-12)


def test_build_clip_sincos_init_is_open_clips_table_and_learnable() -> None:
    from open_clip.pos_embed import get_2d_sincos_pos_embed

    towers = build_clip(tiny_test_config(), pos_init="sincos")
    pos = towers.visual.positional_embedding
    assert pos.requires_grad and pos.shape == (65, 48)
    np.testing.assert_allclose(pos.detach().numpy(), get_2d_sincos_pos_embed(48, 8, cls_token=True), rtol=1e-6)
    random = build_clip(tiny_test_config(), pos_init="random").visual.positional_embedding
    assert not torch.allclose(random, pos)
    with pytest.raises(ValueError, match="pos_init"):
        build_clip(tiny_test_config(), pos_init="rope")


# -- recipe ------------------------------------------------------------------------------------------------------

def test_shipped_recipe_matches_the_prototypes_best_configuration() -> None:
    recipe = ClipRecipe.load(RECIPE_PATH)
    oc = recipe.model_config.open_clip_config()
    assert recipe.image_size == 64 and recipe.model_config.patch_size == 8
    assert recipe.model_config.conv_stem == (32, 64)
    assert oc["vision_cfg"]["width"] == 128 and oc["vision_cfg"]["layers"] == 4
    assert oc["text_cfg"]["width"] == 128 and oc["text_cfg"]["layers"] == 3
    assert oc["text_cfg"]["context_length"] == 16 and oc["embed_dim"] == 128
    assert (recipe.batch_size, recipe.lr, recipe.warmup_steps) == (128, 2e-3, 100)
    assert recipe.objects_p == (0.8, 0.12, 0.08)
    assert recipe.dense_weight == 1.0 and recipe.steps is not None  # R1: the dense term, a reproducible length
    assert ClipRecipe.from_dict(recipe.to_dict()) == recipe


def test_recipe_rejects_bad_input(tmp_path) -> None:
    d = json.loads(RECIPE_PATH.read_text())
    with pytest.raises(ValueError, match="unknown ClipRecipe field"):
        ClipRecipe.from_dict({**d, "learning_rate": 1.0})
    with pytest.raises(ValueError, match="steps or minutes"):
        ClipRecipe.from_dict({**d, "steps": None, "minutes": None})
    with pytest.raises(ValueError, match="pos_init"):
        ClipRecipe.from_dict({**d, "pos_init": "rope"})
    with pytest.raises(ValueError, match="dense_weight"):
        ClipRecipe.from_dict({**d, "dense_weight": -1.0})
    with pytest.raises(FileNotFoundError, match="nope.json"):
        ClipRecipe.load(tmp_path / "nope.json")


# -- real (tiny) runs --------------------------------------------------------------------------------------------

def test_train_clip_output_survives_save_and_load_clip(tmp_path) -> None:
    towers, metrics = train_clip(mini_recipe(), log=lambda s: None, progress=False)
    assert metrics["steps"] == 3 and [e["step"] for e in metrics["curve"]] == [2, 3]
    path = tmp_path / "clip.safetensors"
    save_clip(path, towers)
    loaded = load_clip(path)
    images = torch.randn(3, 3, 64, 64)
    tokens = torch.randint(1, 49000, (3, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded.visual(images), towers.visual(images), rtol=0, atol=0)
        torch.testing.assert_close(loaded.text(tokens), towers.text(tokens), rtol=0, atol=0)


def test_pretrain_clip_is_deterministic_and_writes_metrics(tmp_path) -> None:
    a = pretrain_clip(mini_recipe(), tmp_path / "a.safetensors", log=lambda s: None, progress=False)
    b = pretrain_clip(mini_recipe(), tmp_path / "b.safetensors", log=lambda s: None, progress=False)
    c = pretrain_clip(mini_recipe(), tmp_path / "c.safetensors", seed=1, log=lambda s: None, progress=False)
    from safetensors import safe_open
    from safetensors.torch import load_file

    ta, tb, tc = (load_file(str(p)) for p in (a, b, c))
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not all(torch.equal(ta[k], tc[k]) for k in ta)
    with safe_open(str(a), framework="pt") as f:
        meta = f.metadata()
    metrics, recipe = json.loads(meta["metrics"]), json.loads(meta["recipe"])
    assert recipe["steps"] == 3 and recipe["seed"] == 0
    final = metrics["final"]
    assert final["n_images"] == 64
    for key in ("acc", "acc_seen", "acc_unseen", "bare_name_acc", "interpolated_pos_acc", "acc_at_128px"):
        assert 0.0 <= final[key] <= 1.0
    assert load_clip(a).config == mini_recipe().model_config


def test_the_dense_term_changes_training_and_reports_text_separation(tmp_path) -> None:
    plain, _ = train_clip(mini_recipe(), log=lambda s: None, progress=False)
    dense, metrics = train_clip(mini_recipe(dense_weight=1.0), log=lambda s: None, progress=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(plain.visual(x), dense.visual(x))
    final = metrics["final"]
    assert -1.0 <= final["text_max_cosine"] <= 1.0 and len(final["text_max_cosine_pair"]) == 2
    assert 0 <= final["text_pairs_above_0.9"] <= 64 * 63 // 2


def test_cli_rejects_a_non_safetensors_output(tmp_path) -> None:
    with pytest.raises(SystemExit):
        main(["--config", str(RECIPE_PATH), "--out", str(tmp_path / "clip.pt")])


def test_pretrain_clip_names_a_missing_recipe(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.json"):
        pretrain_clip(tmp_path / "missing.json", tmp_path / "x.safetensors")


def test_pretraining_can_start_from_a_saved_clip_even_at_another_image_size(tmp_path) -> None:
    from safetensors.torch import load_file

    from model.backbone import interpolate_pos_embed

    first = pretrain_clip(mini_recipe(), tmp_path / "first.safetensors", log=lambda s: None, progress=False)
    saved = load_file(str(first))
    # lr ~0: one step from the file leaves its weights (and only a run from the file does)
    same, _ = train_clip(mini_recipe(init_clip=str(first), steps=1, lr=1e-12), log=lambda s: None, progress=False)
    fresh, _ = train_clip(mini_recipe(steps=1, lr=1e-12), log=lambda s: None, progress=False)
    for k, v in same.visual.state_dict().items():
        torch.testing.assert_close(v, saved[f"visual.{k}"], rtol=0, atol=1e-6)
    assert not torch.allclose(fresh.visual.conv1.layers[0].weight, saved["visual.conv1.layers.0.weight"])
    # a 128-px phase: the 8x8 grid's positions re-interpolated to 16x16, every other weight carried over
    config = tiny_test_config(conv_stem=(8, 16))
    big = json.loads(json.dumps(config.clip_config))
    big["vision_cfg"]["image_size"] = 128
    recipe_128 = mini_recipe(model_config=tiny_test_config(conv_stem=(8, 16), clip_config=big), init_clip=str(first),
                             steps=1, lr=1e-12)
    towers, metrics = train_clip(recipe_128, log=lambda s: None, progress=False)
    pos = towers.visual.positional_embedding
    assert pos.shape == (1 + 16 * 16, saved["visual.positional_embedding"].shape[1])
    torch.testing.assert_close(pos, interpolate_pos_embed(saved["visual.positional_embedding"].float(), 16, 16),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(towers.text.token_embedding.weight, saved["text.token_embedding.weight"],
                               rtol=0, atol=1e-6)
    # the CLI and the file's metadata name it; another architecture is refused with the file's name
    out = tmp_path / "second.safetensors"
    pretrain_clip(mini_recipe(steps=1), out, init_clip=str(first), log=lambda s: None, progress=False)
    from safetensors import safe_open
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["recipe"])["init_clip"] == str(first) and len(meta["init_clip_sha256"]) == 64
    wider = json.loads(json.dumps(config.clip_config))
    wider["vision_cfg"]["width"] = 64
    with pytest.raises(ValueError, match="init_clip"):
        train_clip(mini_recipe(model_config=tiny_test_config(conv_stem=(8, 16), clip_config=wider),
                               init_clip=str(first)), log=lambda s: None, progress=False)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        train_clip(mini_recipe(init_clip=str(tmp_path / "nope.safetensors")), log=lambda s: None, progress=False)


def test_bf16_autocast_step_matches_float32_closely() -> None:
    from model.training.shapes.clip_pretrain import DenseTerm, build_optimizer, train_step

    recipe = mini_recipe(dense_weight=1.0)
    losses = []
    for bf16 in (False, True):
        towers = build_clip(recipe.model_config, seed=0)
        scale, dense_scale = (torch.nn.Parameter(torch.tensor(math.log(1 / 0.07))) for _ in range(2))
        optimizer = build_optimizer(towers, scale, recipe, [dense_scale])
        torch.manual_seed(1)
        images, tokens = torch.randn(6, 3, 64, 64), torch.randint(1, 49000, (6, 16))
        groups = torch.arange(6)
        targets = concept_targets([(i,) for i in range(6)], WORLD.num_concepts)
        dense = DenseTerm(torch.randint(1, 49000, (64, 16)), targets, dense_scale, 1.0, 10.0)
        losses.append(train_step(towers, scale, optimizer, images, tokens, groups, dense=dense, bf16=bf16))
    assert math.isfinite(losses[1]) and losses[0] != losses[1]  # bf16 really ran, and rounds differently
    assert abs(losses[1] - losses[0]) < 0.02 * abs(losses[0]), losses
