"""model.train: schedule and optimiser groups, input validation, exact resume, export the service can load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from model.config import tiny_test_config
from model.train import main
from model.training.config import OptimConfig
from model.training.optim import build_optimizer, poly_lr, total_loss

CONCEPTS = ["red square", "blue circle"]


@pytest.fixture(autouse=True)
def _restore_global_torch_state():
    """``main`` sets the global seeds and flush-denormal mode; keep them from leaking into other tests."""
    rng = torch.get_rng_state()
    yield
    torch.set_flush_denormal(False)
    torch.set_rng_state(rng)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Six images with one ground-truth object each, a retrieval JSON, COCO GT and a tiny random CLIP file."""
    from model.backbone import build_text_tower, build_vision_tower
    from model.clip_weights import ClipTowers, save_clip

    root = tmp_path_factory.mktemp("world")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    images, annotations, retrieval = [], [], {c: [] for c in CONCEPTS}
    for i in range(6):
        h, w = 48 + 8 * i, 64
        img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        m = np.zeros((h, w), np.uint8)
        c = i % 2
        if c == 0:
            m[8:28, 10 + i:30 + i] = 1
        else:
            yy, xx = np.mgrid[:h, :w]
            m[(yy - 20) ** 2 + (xx - 30) ** 2 < 100] = 1
        img[m > 0] = (220, 30, 30) if c == 0 else (30, 30, 220)
        name = f"{i:03d}.png"
        Image.fromarray(img).save(root / "images" / name)
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode()
        images.append({"id": i, "file_name": name, "height": h, "width": w})
        annotations.append({"id": i, "image_id": i, "category_id": c + 1, "segmentation": rle, "iscrowd": 0,
                            "area": int(m.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
        retrieval[CONCEPTS[c]].append(str(root / "images" / name))
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": c} for i, c in enumerate(CONCEPTS)]}
    (root / "gt.json").write_text(json.dumps(coco))
    (root / "retrieval.json").write_text(json.dumps(retrieval))
    cfg = tiny_test_config()
    torch.manual_seed(0)
    save_clip(root / "clip.safetensors", ClipTowers(cfg, build_vision_tower(cfg), build_text_tower(cfg)))
    return root


def _config(world: Path, tmp_path: Path, **changes) -> Path:
    config = {
        "model": tiny_test_config().to_dict(),
        "clip_weights": str(world / "clip.safetensors"),
        "vocabulary": CONCEPTS,
        "data": {"retrieval_file": str(world / "retrieval.json"),
                 "ground_truth": {"annotations": str(world / "gt.json"), "image_dir": str(world / "images")}},
        "synthesis": {"max_objects": 3},
        "optim": {"steps": 4, "batch_size": 2, "num_workers": 0, "log_every": 1, "checkpoint_every": 3,
                  "lr": 1e-3},
        "out_dir": str(tmp_path / "run"),
    }
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if name:
            config[section][name] = value
        else:
            config[section] = value
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.json"
    path.write_text(json.dumps(config))
    return path


def test_poly_lr_follows_the_release_schedule_with_its_floor():
    assert poly_lr(5e-5, 0, 100) == 5e-5
    assert poly_lr(5e-5, 50, 100) == pytest.approx(5e-5 * 0.5 ** 0.9)
    assert poly_lr(5e-6, 90, 100) == 1e-6  # 5e-6 * 0.1^0.9 = 6.3e-7 is under the floor
    assert poly_lr(5e-5, 100, 100) == 1e-6


def test_optimizer_groups_encoder_at_a_tenth_and_decays_everything():
    from model.network import ZUTIS

    model = ZUTIS(tiny_test_config())
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    enc, heads = opt.param_groups
    assert enc["lr"] == pytest.approx(1e-4) and heads["lr"] == pytest.approx(1e-3)
    assert enc["weight_decay"] == heads["weight_decay"] == 0.05
    in_groups = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(in_groups) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    assert {id(p) for p in enc["params"]} == {id(p) for p in model.encoder.parameters()}
    assert any(p is model.query_embed for p in heads["params"])


def test_total_loss_applies_each_weight_once():
    losses = {"mask": torch.tensor(2.0), "ce": torch.tensor(3.0)}
    assert total_loss(losses, {"mask": 1.0, "ce": 0.5}).item() == 3.5


@pytest.mark.parametrize("change,missing", [
    ({"clip_weights": "/nonexistent/clip.safetensors"}, "/nonexistent/clip.safetensors"),
    ({"data.retrieval_file": "/nonexistent/retrieval.json"}, "/nonexistent/retrieval.json"),
    ({"data.ground_truth": {"annotations": "/nonexistent/gt.json", "image_dir": "/tmp"}}, "/nonexistent/gt.json"),
])
def test_missing_inputs_are_named_before_any_work(world, tmp_path, change, missing):
    with pytest.raises(FileNotFoundError, match=missing):
        main(["--config", str(_config(world, tmp_path, **change)), "--device", "cpu"])
    assert not (tmp_path / "run").exists()


def test_config_typos_and_bad_settings_are_rejected(world, tmp_path):
    with pytest.raises(ValueError, match="stepz"):
        main(["--config", str(_config(world, tmp_path, **{"optim.stepz": 3})), "--device", "cpu"])
    with pytest.raises(ValueError, match="ignore_index"):
        main(["--config", str(_config(world, tmp_path, synthesis={"ignore_index": 2})), "--device", "cpu"])
    with pytest.raises(ValueError, match="ce_logit_scale"):
        main(["--config", str(_config(world, tmp_path, **{"optim.ce_logit_scale": 0.0})), "--device", "cpu"])
    with pytest.raises(FileNotFoundError, match="train_state"):
        main(["--config", str(_config(world, tmp_path)), "--device", "cpu", "--resume"])


def _state(path: Path) -> dict:
    return torch.load(str(path), map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_resume_continues_exactly_and_export_loads_in_the_service_format(world, tmp_path):
    from model.checkpoint import load_checkpoint

    config = _config(world, tmp_path, eval={"annotations": str(world / "gt.json"),
                                            "image_dir": str(world / "images")})
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["--config", str(config), "--device", "cpu", "--out", str(straight)]) == 0
    assert main(["--config", str(config), "--device", "cpu", "--out", str(split), "--stop-at", "2"]) == 0
    assert _state(split / "train_state.pt")["step"] == 2 and not (split / "model.safetensors").exists()
    with pytest.raises(FileExistsError):  # never silently restart over an existing run
        main(["--config", str(config), "--device", "cpu", "--out", str(split)])
    with pytest.raises(ValueError, match="config differs"):
        main(["--config", str(_config(world, tmp_path, **{"optim.lr": 2e-3})), "--device", "cpu", "--out",
              str(split), "--resume"])
    assert main(["--config", str(config), "--device", "cpu", "--out", str(split), "--resume"]) == 0

    a, b = _state(straight / "train_state.pt"), _state(split / "train_state.pt")
    assert a["step"] == b["step"] == 4
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    initial = _initial_encoder(world)
    assert any(not torch.equal(a["model"][f"encoder.{k}"], v) for k, v in initial.items()), "encoder never moved"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])

    loaded = load_checkpoint(straight / "model.safetensors")
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, a["model"][k]), k
    meta = loaded.metadata
    assert meta.vocabulary == ["background", *CONCEPTS]
    prov = meta.provenance
    assert {"command", "git", "date", "data", "config", "metrics"} <= set(prov)
    assert prov["steps"] == 4 and prov["config"]["optim"]["steps"] == 4
    assert prov["metrics"]["num_images"] == 6 and "instances" in prov["metrics"]
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["lr"][0] < r["lr"][1] for r in log)
    with torch.no_grad():  # the exported model runs
        out = loaded.model(torch.zeros(1, 3, 64, 64))
    assert out.mask_probs.shape == (1, 10, 16, 16)


def _initial_encoder(world: Path) -> dict:
    """The encoder weights as in the CLIP file, which the CE loss must have moved."""
    from model.clip_weights import load_clip

    return load_clip(world / "clip.safetensors").visual.state_dict()


@pytest.mark.parametrize("name,steps,ignore,classes", [("coco_vit_b_16", 20000, 255, 80),
                                                       ("imagenet_s919_vit_b_16", 80000, 1000, 919)])
def test_shipped_recipes_carry_the_reference_hyper_parameters(name, steps, ignore, classes):
    from model.training.config import TrainConfig

    path = Path(__file__).parents[2] / "model" / "configs" / f"{name}.json"
    cfg = TrainConfig.from_dict(json.loads(path.read_text()))
    o, s = cfg.optim, cfg.synthesis
    assert (o.steps, o.batch_size, o.lr, o.encoder_lr_mult, o.weight_decay, o.poly_power, o.min_lr) == \
        (steps, 8, 5e-5, 0.1, 0.05, 0.9, 1e-6)
    assert o.loss_weights == {"mask": 1.0, "ce": 1.0} and o.seed == 0
    assert (s.crop_size, s.max_objects, s.scale_range, s.random_duplicate, s.ignore_index, s.blur_kernel) == \
        (384, 10, (0.1, 1.0), True, ignore, 39)
    assert len(cfg.vocabulary) == classes and cfg.data.retrieval_n == 500
    assert cfg.model.num_queries == 100 and cfg.model.decoder_layers == 6 and cfg.model.input_size == 384


@pytest.mark.slow
def test_same_script_runs_under_torchrun_with_two_cpu_ranks(world, tmp_path):
    import os
    import subprocess
    import sys

    from model.checkpoint import read_metadata

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "model.train", "--config", str(_config(world, tmp_path, **{"optim.batch_size": 1})), "--device", "cpu",
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=Path(__file__).parents[2], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("step 4/4") == 1  # only rank 0 logs
    assert read_metadata(out / "model.safetensors").provenance["world_size"] == 2
    assert _state(out / "train_state.pt")["step"] == 4


def test_first_images_restricts_ground_truth_to_the_evaluated_scenes():
    from model.training.export import first_images

    coco = {"images": [{"id": 7}, {"id": 3}], "categories": [],
            "annotations": [{"id": 1, "image_id": 3}, {"id": 2, "image_id": 7}, {"id": 3, "image_id": 3}]}
    assert first_images(coco, None) is coco
    first = first_images(coco, 1)
    assert first["images"] == [{"id": 7}] and [a["id"] for a in first["annotations"]] == [2]
    assert [a["id"] for a in first_images(coco, 2)["annotations"]] == [1, 2, 3]


def test_unset_opt_in_sections_stay_out_of_the_saved_config():
    # training states and checkpoints written before init_checkpoint / oracle_scenes existed must still --resume
    from model.training.config import TrainConfig

    path = Path(__file__).parents[2] / "model" / "configs" / "coco_vit_b_16.json"
    d = TrainConfig.from_dict(json.loads(path.read_text())).to_dict()
    assert "init_checkpoint" not in d and "oracle_scenes" not in d
    assert TrainConfig.from_dict(d).to_dict() == d


def test_cpu_bf16_autocast_trains_close_to_float32_and_may_change_on_resume(world, tmp_path):
    plain = _config(world, tmp_path)
    amp = _config(world, tmp_path, **{"optim.cpu_amp": True})
    assert main(["--config", str(plain), "--device", "cpu", "--out", str(tmp_path / "fp32")]) == 0
    assert main(["--config", str(amp), "--device", "cpu", "--out", str(tmp_path / "bf16")]) == 0
    a, b = _state(tmp_path / "fp32" / "train_state.pt"), _state(tmp_path / "bf16" / "train_state.pt")
    moved = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert moved, "cpu_amp changed nothing: autocast did not run"
    for k in a["model"]:  # 4 steps at lr 1e-3 from the same start: bf16 rounding, not another model
        assert torch.isfinite(b["model"][k]).all() and (a["model"][k] - b["model"][k]).abs().max() < 0.05, k
    logs = [[json.loads(line)["total"] for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
            for d in ("fp32", "bf16")]
    assert logs[0][0] == pytest.approx(logs[1][0], rel=0.05)
    # a speed knob, not a change of recipe: a float32 run may be resumed with bf16 autocast
    split = tmp_path / "split"
    assert main(["--config", str(plain), "--device", "cpu", "--out", str(split), "--stop-at", "2"]) == 0
    assert main(["--config", str(amp), "--device", "cpu", "--out", str(split), "--resume"]) == 0
