"""Train ZUTIS (reference §4): ``python -m model.train --config model/configs/X.json [--resume] [--out DIR]``.

Reads top to bottom: config -> setup -> model -> data stages -> one loop (log, checkpoint) -> export.
The same script runs under ``torchrun`` (DDP, one process per GPU; only rank 0 writes).

- World (optional ``world`` section, ``model.stages.WorldConfig``): a run from nothing first builds its images,
  held-out scenes and CLIP (the shapes world) as cached stages, which fill in ``clip_weights``, ``data.index_dirs``,
  ``eval`` and ``val``.
- Data stages (``model.stages``): image index -> top-n retrieval per concept -> pseudo-masks, each cached in a
  directory keyed by a content hash of its inputs, so a re-run (or ``--resume``) skips finished stages. A config
  may instead give a finished retrieval JSON, a pseudo-mask folder, or ground-truth masks (the "oracle").
- Resume: the training state (model, AdamW, step, RNGs) is written atomically every ``checkpoint_every`` steps.
  The learning rate and the data stream are pure functions of the step, so ``--resume`` continues exactly as an
  uninterrupted run (bitwise on CPU).
- Export: the service's checkpoint format (``model.checkpoint``, at ``export_path``) with provenance (command, git
  commit, date, data, config, stage timings); with a ``val`` set, the score threshold chosen on it
  (``model.threshold``); with an ``eval`` set, its metrics (over ``eval.subsets`` too).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from model.config import InferenceParams, ModelConfig
from model.training.copy_paste import CopyPasteDataset, StepBatchSampler, SynthesisParams, collate_samples
from model.training.criterion import compute_losses
from model.training.stages import DataConfig, World, WorldConfig, prepare_training_data, prepare_world
from model.training.state import load_training_state, save_training_state

# ---------------------------------------------------------------------------------------------------------------
# Config: JSON -> dataclasses (unknown keys are errors, so a typo never silently falls back to a default)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimConfig:
    """The loop's hyper-parameters; defaults are the official COCO recipe (reference §4.1)."""

    steps: int = 20000
    batch_size: int = 8
    lr: float = 5e-5
    encoder_lr_mult: float = 0.1
    weight_decay: float = 0.05
    poly_power: float = 0.9
    min_lr: float = 1e-6
    loss_weights: dict[str, float] = field(default_factory=lambda: {"mask": 1.0, "ce": 1.0})
    ce_logit_scale: float = 1.0  # the release: raw cosine logits (model.criterion)
    grad_clip: float | None = None
    seed: int = 0
    num_workers: int = 8
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    log_every: int = 250
    checkpoint_every: int = 1000


@dataclass(frozen=True)
class EvalConfig:
    """An eval set for the exported model, whose metrics go into its metadata: a COCO instances JSON
    (``annotations``) with ``image_dir`` and optional semantic PNGs (``label_dir``), or, without ``annotations``,
    an image folder + label-PNG folder whose class k is vocabulary concept k (``model.evaluate``)."""

    image_dir: str = ""  # a config with a world section leaves the paths to it
    annotations: str | None = None
    label_dir: str | None = None
    max_images: int | None = None
    subsets: dict[str, list[str]] | None = None  # {"unseen": [concepts]}: metrics over these classes too
    score_threshold: float | None = None  # None: the exported default; AP wants a low floor (the release: 0.001)
    class_agnostic: bool = False  # opt-in: also class-agnostic mask AP (report["class_agnostic"]), same predictions

    def __post_init__(self) -> None:
        if self.image_dir and self.annotations is None and self.label_dir is None:
            raise ValueError("eval needs 'annotations' (COCO JSON) or 'label_dir' (semantic label PNGs)")


@dataclass(frozen=True)
class OracleScenesConfig:
    """Opt-in (the ``oracle_scenes`` section; needs a ``world``): train on ``scenes`` freshly rendered 1-8-object
    scenes (``seed``, which must differ from the world's validation and test seeds) with their true masks and
    labels under ``labels`` ("colour": the 8 colours as the concepts, or "concept": the 64 colour-shape concepts),
    in place of retrieval and pseudo-masks; the validation and test scenes are relabelled the same way
    (``model.shapes.oracle``). The ladder's R0 / R2 rungs (docs/ladder-r0.md)."""

    scenes: int = 2000
    seed: int = 3
    labels: str = "colour"

    def __post_init__(self) -> None:
        from model.training.shapes.oracle import LABELLINGS

        if self.labels not in LABELLINGS:
            raise ValueError(f"oracle_scenes.labels must be one of {list(LABELLINGS)}, got {self.labels!r}")
        if self.scenes < 1:
            raise ValueError(f"oracle_scenes.scenes must be positive, got {self.scenes}")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    clip_weights: str
    vocabulary: tuple[str, ...]  # training concepts without "background"
    data: DataConfig
    synthesis: SynthesisParams
    optim: OptimConfig
    eval: EvalConfig | None = None
    out_dir: str = "runs/zutis"
    description: str = ""
    cache_dir: str | None = None  # stage outputs; default <out_dir>/stages
    world: WorldConfig | None = None
    val: EvalConfig | None = None  # COCO scenes the exported score threshold is chosen on
    export_path: str | None = None  # default <out_dir>/model.safetensors
    export_dtype: str = "float32"  # or "float16": half the file, loaded back as float32
    export_vocabulary: tuple[str, ...] | None = None  # the checkpoint's default concepts; default: vocabulary
    inference: dict[str, Any] = field(default_factory=dict)  # InferenceParams defaults stored in the checkpoint
    # opt-in: a ZUTIS checkpoint whose encoder and text tower initialise the model (the heads stay random) instead of
    # the CLIP file's; its architecture must match ``model``
    init_checkpoint: str | None = None
    oracle_scenes: OracleScenesConfig | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        _reject_unknown(d, cls, "config")
        model = ModelConfig.from_dict(d["model"])
        world = _section(WorldConfig, d["world"], "world") if d.get("world") else None
        if world is None and "clip_weights" not in d:
            raise ValueError("config needs 'clip_weights' (or a 'world' section that pre-trains one)")
        oracle = _section(OracleScenesConfig, d["oracle_scenes"], "oracle_scenes") if d.get("oracle_scenes") else None
        if oracle is not None:
            from model.training.shapes.oracle import labelling_vocabulary

            if world is None:
                raise ValueError("oracle_scenes needs a 'world' section (its validation and test scenes)")
            if oracle.seed in (world.val_seed, world.test_seed):
                raise ValueError(f"oracle_scenes.seed {oracle.seed} is the seed of the validation or test scenes: "
                                 "training scenes must never be evaluation scenes")
            d.setdefault("vocabulary", labelling_vocabulary(oracle.labels))
            d.setdefault("export_vocabulary", labelling_vocabulary(oracle.labels))
        vocab = d.get("vocabulary") or (_world_concepts(world.train_split) if world else None)
        if vocab is None:
            raise ValueError("config needs 'vocabulary' (or a 'world' section whose split provides it)")
        if isinstance(vocab, str):
            from model.vocabularies import load_vocabulary

            vocab = load_vocabulary(vocab)
        vocab = [v for v in vocab if v != "background"]
        if not vocab or len(set(vocab)) != len(vocab):
            raise ValueError("config 'vocabulary' must be a non-empty list of distinct concepts (or a shipped name)")
        synth = dict(d.get("synthesis", {}))
        synth.setdefault("crop_size", model.input_size)
        synth.setdefault("image_mean", model.image_mean)
        synth.setdefault("image_std", model.image_std)
        data = _section(DataConfig, d.get("data", {}), "data")
        export_vocab = d.get("export_vocabulary") or (_world_concepts("all") if world else None)
        if d.get("export_dtype", "float32") not in _EXPORT_DTYPES:
            raise ValueError(f"export_dtype must be one of {sorted(_EXPORT_DTYPES)}, got {d['export_dtype']!r}")
        InferenceParams.from_dict(d.get("inference", {}))  # validates names and values now
        return cls(model=model, clip_weights=d.get("clip_weights", ""), vocabulary=tuple(vocab), data=data,
                   synthesis=SynthesisParams.from_dict(synth), optim=_section(OptimConfig, d.get("optim", {}), "optim"),
                   eval=_section(EvalConfig, d["eval"], "eval") if d.get("eval") else None,
                   out_dir=d.get("out_dir", cls.out_dir), cache_dir=d.get("cache_dir"),
                   description=d.get("description", ""), world=world,
                   val=_section(EvalConfig, d["val"], "val") if d.get("val") else None,
                   export_path=d.get("export_path"), export_dtype=d.get("export_dtype", "float32"),
                   export_vocabulary=tuple(export_vocab) if export_vocab else None,
                   inference=dict(d.get("inference", {})), init_checkpoint=d.get("init_checkpoint"),
                   oracle_scenes=oracle)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model"] = self.model.to_dict()
        for key in ("init_checkpoint", "oracle_scenes"):  # opt-in: absent while unset, so that configs and training
            if out[key] is None:                          # states written before these fields existed still match
                del out[key]
        return json.loads(json.dumps(out))


_EXPORT_DTYPES = {"float32": None, "float16": torch.float16}


def _world_concepts(split: str) -> list[str]:
    from model.training.shapes.world import ShapesWorld

    world = ShapesWorld()
    return [world.concept_name(i) for i in world.split_ids(split)]


def with_world(cfg: TrainConfig, world: World) -> TrainConfig:
    """``cfg`` with the paths the world's stages built: CLIP, index (and its truth for ``masks: "truth"``), the
    test scenes as ``eval`` (with seen/unseen subsets) and the validation scenes as ``val``; of the config's own
    ``eval`` / ``val`` sections only ``max_images``, ``score_threshold`` and ``class_agnostic`` are kept."""
    from model.training.shapes.world import ShapesWorld

    shapes = ShapesWorld()
    data = dataclasses.replace(
        cfg.data, index_dirs=(str(world.index_images),),
        # absolute, as the retrieval lists (model.index records absolute paths): the oracle's masks are keyed by it
        ground_truth={"annotations": str(world.index_truth), "image_dir": os.path.abspath(world.index_images)}
        if cfg.world.masks == "truth" else cfg.data.ground_truth)
    subsets = {s: [shapes.concept_name(i) for i in shapes.split_ids(s)] for s in ("seen", "unseen")}

    def scenes(folder: Path, given: EvalConfig | None, **kw: Any) -> EvalConfig:
        return EvalConfig(image_dir=str(folder / "images"), annotations=str(folder / "instances.json"),
                          label_dir=str(folder / "labels"),
                          **({"max_images": given.max_images, "score_threshold": given.score_threshold,
                              "class_agnostic": given.class_agnostic} if given else {}), **kw)

    return dataclasses.replace(cfg, clip_weights=str(world.clip_weights), data=data,
                               eval=scenes(world.test_dir, cfg.eval, subsets=subsets),
                               val=scenes(world.val_dir, cfg.val))


def with_oracle_scenes(cfg: TrainConfig, cache_dir: Path, log) -> TrainConfig:
    """``cfg`` (already ``with_world``) training on rendered scenes with true masks and labels (``oracle_scenes``):
    a cached stage renders and labels them; eval / val become the relabelled test / validation scenes."""
    from model.training.shapes import oracle as scene_oracle
    from model.training.stages import run_stage

    o, w = cfg.oracle_scenes, cfg.world
    train_dir = run_stage(cache_dir, "shapes_oracle_scenes",
                          {"n": o.scenes, "seed": o.seed, "labels": o.labels, "size": w.scene_size},
                          lambda out: scene_oracle.write_training_scenes(out, o.scenes, o.seed, o.labels,
                                                                         size=w.scene_size), log)

    def relabel(given: EvalConfig, split: str) -> EvalConfig:
        source = Path(given.image_dir).parent
        folder = run_stage(cache_dir, f"shapes_{split}_{o.labels}", {"source": str(source), "labels": o.labels},
                           lambda out: scene_oracle.write_relabelled_scenes(source, out, o.labels), log)
        return dataclasses.replace(given, image_dir=str(folder / "images"), annotations=str(folder / "instances.json"),
                                   label_dir=str(folder / "labels"), subsets=None)

    retrieval_file = Path(cfg.out_dir) / "oracle_retrieval.json"  # absolute paths of this checkout's stage folder
    retrieval_file.parent.mkdir(parents=True, exist_ok=True)
    retrieval_file.write_text(json.dumps(scene_oracle.retrieval_lists(train_dir)))
    data = dataclasses.replace(cfg.data, retrieval_file=str(retrieval_file), pseudo_mask_dir=None,
                               ground_truth={"annotations": str(train_dir / "instances.json"),
                                             "image_dir": os.path.abspath(train_dir / "images")})
    return dataclasses.replace(cfg, data=data, eval=relabel(cfg.eval, "test"), val=relabel(cfg.val, "val"))


def _reject_unknown(d: dict[str, Any], cls: type, where: str) -> None:
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown key(s) in {where}: {sorted(unknown)}")


def _section(cls: type, d: dict[str, Any], where: str) -> Any:
    _reject_unknown(d, cls, where)
    return cls(**d)


def load_config(path: str | Path, steps: int | None = None) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    d = json.loads(path.read_text())
    if steps is not None:
        d.setdefault("optim", {})["steps"] = steps
    return TrainConfig.from_dict(d)


def validate_inputs(cfg: TrainConfig) -> None:
    """Check every file and folder the run will read, and the settings that could only fail later."""
    from model.training.stages import validate_data_inputs

    if cfg.init_checkpoint and not Path(cfg.init_checkpoint).is_file():
        raise FileNotFoundError(f"init_checkpoint: file not found: {cfg.init_checkpoint}")
    if not Path(cfg.clip_weights).is_file():
        raise FileNotFoundError(f"clip_weights: file not found: {cfg.clip_weights}")
    validate_data_inputs(cfg.data, cfg.clip_weights)
    for name, e in (("eval", cfg.eval), ("val", cfg.val)):
        if e is None:
            continue
        if name == "val" and not e.annotations:
            raise ValueError("val needs 'annotations' (COCO JSON): the score threshold is chosen on instances")
        checks = [(f"{name}.image_dir", e.image_dir, Path.is_dir)]
        if e.annotations:
            checks.append((f"{name}.annotations", e.annotations, Path.is_file))
        if e.label_dir:
            checks.append((f"{name}.label_dir", e.label_dir, Path.is_dir))
        for what, p, exists in checks:
            if not exists(Path(p)):
                raise FileNotFoundError(f"{what}: not found: {p}")
    o = cfg.optim
    if o.steps < 1 or o.batch_size < 1 or o.log_every < 1 or o.checkpoint_every < 1 or o.num_workers < 0:
        raise ValueError("optim.steps, batch_size, log_every and checkpoint_every must be positive")
    if not (math.isfinite(o.ce_logit_scale) and o.ce_logit_scale > 0):
        raise ValueError(f"optim.ce_logit_scale must be a positive number, got {o.ce_logit_scale}")
    unknown_losses = set(o.loss_weights) - {"mask", "ce"}
    if unknown_losses:
        raise ValueError(f"optim.loss_weights names unknown losses {sorted(unknown_losses)}; known: mask, ce")
    if cfg.synthesis.ignore_index <= len(cfg.vocabulary):
        raise ValueError(f"synthesis.ignore_index {cfg.synthesis.ignore_index} collides with label ids up to "
                         f"{len(cfg.vocabulary)} (ImageNet-S919 uses 1000)")


# ---------------------------------------------------------------------------------------------------------------
# Schedule and optimiser
# ---------------------------------------------------------------------------------------------------------------


def poly_lr(base_lr: float, step: int, total_steps: int, power: float = 0.9, min_lr: float = 1e-6) -> float:
    """PolyLR of the release: ``max(base * (1 - step / total) ** power, min_lr)``; step 0 uses ``base``."""
    return max(base_lr * (1.0 - step / total_steps) ** power, min_lr)


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW with two groups: the CLIP encoder at ``lr * encoder_lr_mult``, everything else at ``lr``; weight
    decay on every parameter (LayerNorms, biases and queries included, as the release)."""
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    encoder_ids = {id(p) for p in encoder}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids]
    groups = [{"params": encoder, "base_lr": optim.lr * optim.encoder_lr_mult, "name": "encoder"},
              {"params": rest, "base_lr": optim.lr, "name": "heads"}]
    for g in groups:
        g["lr"] = g["base_lr"]
    return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, step: int, optim: OptimConfig) -> list[float]:
    lrs = []
    for g in optimizer.param_groups:
        g["lr"] = poly_lr(g["base_lr"], step, optim.steps, optim.poly_power, optim.min_lr)
        lrs.append(g["lr"])
    return lrs


def total_loss(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """The one place loss weights are applied (a loss missing from ``weights`` has weight 1)."""
    return sum(weights.get(name, 1.0) * value for name, value in losses.items())


# ---------------------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_arg: str) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world)
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    device = torch.device(f"cuda:{dist.local_rank}" if device_arg == "cuda" else device_arg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tune_cpu_allocator() -> bool:
    """glibc malloc made large CPU activations 5-10x slower and erratic (shapes-notes.md); the fix is the
    ``MALLOC_MMAP_THRESHOLD_=32 MiB`` / ``MALLOC_TRIM_THRESHOLD_`` (huge) settings, applied here with ``mallopt`` so
    a plain ``python -m model.train`` gets them (mallopt takes a C int: the trim threshold is capped at 2 GiB - 1).
    Returns whether they were applied (False off glibc)."""
    import ctypes
    import ctypes.util

    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def git_commit() -> dict[str, Any]:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    """ZUTIS with its encoder initialised from the CLIP weights (heads random) and the CLIP text tower."""
    from model.clip_weights import load_clip
    from model.network import ZUTIS

    model = ZUTIS(cfg.model)
    if cfg.init_checkpoint:
        from model.checkpoint import load_checkpoint

        loaded = load_checkpoint(cfg.init_checkpoint)
        model.encoder.load_state_dict(loaded.model.encoder.state_dict())
        return model, loaded.text_encoder.tower.float().eval().requires_grad_(False)
    towers = load_clip(cfg.clip_weights, cfg.model)
    model.encoder.load_state_dict(towers.visual.state_dict())
    text_tower = towers.text.eval().requires_grad_(False)
    return model, text_tower


@torch.no_grad()
def encode_vocabulary(text_tower: torch.nn.Module, cfg: TrainConfig) -> torch.Tensor:
    """Unit-norm (C, E) text embeddings of ``["background", *vocabulary]`` (raw names, reference §2)."""
    from model.text import TextEncoder

    encoder = TextEncoder(cfg.model, text_tower)
    return encoder.encode(["background", *cfg.vocabulary]).float()


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------


def export(path: Path, model: torch.nn.Module, text_tower: torch.nn.Module, cfg: TrainConfig,
           provenance: dict[str, Any], device: torch.device, log) -> Path:
    """Write the service checkpoint; with a ``val`` set, choose its score threshold there (``model.threshold``);
    with an ``eval`` set, evaluate it and store the metrics (and timings) in its provenance."""
    from model.checkpoint import CheckpointMetadata, save_checkpoint
    from model.training.evaluate import evaluate_checkpoint, load_coco_dataset, load_label_folder_dataset
    from model.training.operating_point import choose_score_threshold, match_detections, operating_points

    metadata = CheckpointMetadata(model_id=path.stem if cfg.export_path else (path.parent.name or "zutis"),
                                  model_config=cfg.model,
                                  vocabulary=["background", *(cfg.export_vocabulary or cfg.vocabulary)],
                                  inference=InferenceParams.from_dict(cfg.inference), provenance=provenance)
    timings = provenance.setdefault("timings_seconds", {})

    def save() -> None:
        save_checkpoint(path, model, text_tower, metadata, dtype=_EXPORT_DTYPES[cfg.export_dtype])

    def load(e: EvalConfig) -> Any:
        return load_coco_dataset(e.annotations, e.image_dir, e.label_dir) if e.annotations else \
            load_label_folder_dataset(e.image_dir, e.label_dir, cfg.export_vocabulary or cfg.vocabulary)

    save()
    if cfg.val is not None:
        start = time.monotonic()
        val = load(cfg.val)
        log(f"choosing the score threshold on {len(val)} validation images")
        # one pass with the lowest candidate as floor; higher floors only drop detections (model.threshold)
        run = evaluate_checkpoint(path, val, device=str(device), max_images=cfg.val.max_images,
                                  score_threshold=0.001)
        threshold, points = choose_score_threshold(_first_images(val.coco, cfg.val.max_images), run.results)
        metadata.inference = metadata.inference.with_overrides(score_threshold=threshold)
        metadata.provenance["score_threshold"] = {
            "chosen": threshold, "criterion": "max instance F1 at mask IoU 0.5", "val_images": run.report["num_images"],
            "val_dir": cfg.val.image_dir, "points": points}
        timings["choose_threshold"] = round(time.monotonic() - start, 1)
        log(f"score threshold {threshold} (val F1 {max(p['f1'] for p in points):.3f})")
        save()
    if cfg.eval is not None:
        start = time.monotonic()
        e = cfg.eval
        dataset = load(e)
        log(f"evaluating {path} on {len(dataset)} images")
        overrides = {} if e.score_threshold is None else {"score_threshold": e.score_threshold}
        evaluation = evaluate_checkpoint(path, dataset, device=str(device), max_images=e.max_images,
                                         subsets=e.subsets, **overrides)
        report = dict(evaluation.report)
        report.pop("concepts", None)
        for subset in report.get("subsets", {}).values():
            subset.pop("concepts", None)
        if e.class_agnostic and dataset.coco is not None:
            from model.training.evaluate import evaluate_instances

            report["class_agnostic"] = evaluate_instances(
                dataset.coco, evaluation.results, class_agnostic=True,
                image_ids=[s.image_id for s in dataset.samples[:e.max_images]])
        if dataset.coco is not None:
            report["operating_point"] = operating_points(*match_detections(_first_images(dataset.coco, e.max_images),
                                                                             evaluation.results),
                                                         [metadata.inference.score_threshold])[0]
        metadata.provenance["metrics"] = report
        timings["evaluate"] = round(time.monotonic() - start, 1)
        save()
        log("metrics: " + json.dumps(report, default=str)[:2000])
    return path


def _first_images(coco: dict[str, Any], max_images: int | None) -> dict[str, Any]:
    """The COCO dataset restricted to its first ``max_images`` images (the ones an evaluation with ``max_images``
    predicted), so that recall is counted over the objects of those images only; all of it for None."""
    if max_images is None:
        return coco
    images = coco["images"][:max_images]
    ids = {im["id"] for im in images}
    return {**coco, "images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}


# ---------------------------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------------------------

# Settings that may change between an interrupted run and its --resume without changing the result.
_RESUME_MAY_CHANGE = ("out_dir", "cache_dir", "num_workers", "log_every", "checkpoint_every", "eval", "val",
                      "description", "export_path", "export_dtype", "export_vocabulary", "inference")


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    c = json.loads(json.dumps(config))
    for k in _RESUME_MAY_CHANGE:
        c.pop(k, None)
        c.get("optim", {}).pop(k, None)
    return c


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="training config JSON (see model/configs/)")
    p.add_argument("--out", help="run directory (default: the config's out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/train_state.pt")
    p.add_argument("--steps", type=int, help="override optim.steps (the schedule length)")
    p.add_argument("--stop-at", type=int, help="stop after this step, saving the training state, without exporting "
                                               "(for time-limited jobs; continue with --resume)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--stages-only", action="store_true", help="build the data stages, then exit")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = [sys.executable, "-m", "model.train", *(sys.argv[1:] if argv is None else argv)]

    # -- config: everything the run reads is checked here, before any work
    cfg = load_config(args.config, steps=args.steps)
    out_dir = Path(args.out or cfg.out_dir)
    cfg = dataclasses.replace(cfg, out_dir=str(out_dir))
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out_dir / "stages"
    if cfg.world is None:
        validate_inputs(cfg)  # a world's inputs exist only once its stages have run (below)
    state_path = out_dir / "train_state.pt"
    if args.resume and not state_path.is_file():
        raise FileNotFoundError(f"--resume: no training state at {state_path}")
    if not args.resume and state_path.exists():
        raise FileExistsError(f"{state_path} exists: pass --resume to continue that run, or choose another --out")
    if args.stop_at is not None and args.stop_at < 1:
        raise ValueError("--stop-at must be positive")

    # -- setup
    dist, device = setup_distributed(args.device)
    log = _logger(dist)
    torch.set_flush_denormal(True)  # denormals made CPU step times swing 10x (shapes-notes.md)
    if device.type == "cpu":
        tune_cpu_allocator()
    seed_everything(cfg.optim.seed)
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    log(f"rank {dist.rank}/{dist.world_size} on {device}; run directory {out_dir}")
    timings: dict[str, float] = {}
    clock = time.monotonic()

    # -- world: a run from nothing builds its images, held-out scenes and CLIP first (cached stages)
    if cfg.world is not None:
        if dist.world_size > 1:
            raise ValueError("a 'world' section builds its stages in one process: run it once without torchrun")
        cfg = with_world(cfg, prepare_world(cfg.world, cache_dir, log))
        if cfg.oracle_scenes is not None:
            cfg = with_oracle_scenes(cfg, cache_dir, log)
        validate_inputs(cfg)
        timings["world"], clock = round(time.monotonic() - clock, 1), time.monotonic()

    # -- model: built before the data stages, so a CLIP file that does not fit fails now, not hours later, and the
    # random head initialisation does not depend on whether the stages were cached
    model, text_tower = build_model(cfg)
    text_embeddings = encode_vocabulary(text_tower, cfg).to(device)

    # -- data
    data = prepare_training_data(cfg.data, cfg.vocabulary, cfg.clip_weights, cfg.model, cache_dir, device,
                                 is_main=dist.main, log=log)
    timings["data"], clock = round(time.monotonic() - clock, 1), time.monotonic()
    if args.stages_only:
        return 0
    dataset = CopyPasteDataset(data.retrieval, cfg.vocabulary, data.annotations, cfg.synthesis, cfg.optim.seed)
    log(f"{len(dataset)} retrieved entries ({data.provenance['images']} images), {len(cfg.vocabulary)} concepts")

    # -- optimiser (and the state of an interrupted run)
    model.to(device).train()
    optimizer = build_optimizer(model, cfg.optim)
    step = 0
    if args.resume:
        step, extra = load_training_state(state_path, model, optimizer)
        if _comparable(extra.get("config", {})) != _comparable(cfg.to_dict()):
            raise ValueError(f"--resume: the config differs from the one {state_path} was trained with "
                             f"(only {', '.join(_RESUME_MAY_CHANGE)} may change)")
        log(f"resumed at step {step}")
    train_model = model
    if dist.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    o = cfg.optim
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatchSampler(o.batch_size, o.steps, step, dist.rank, dist.world_size),
        collate_fn=collate_samples, num_workers=o.num_workers, pin_memory=device.type == "cuda",
        generator=torch.Generator())  # its own generator: the loader must not draw from the global RNG
    stop = min(o.steps, args.stop_at) if args.stop_at else o.steps
    amp = device.type == "cuda" and o.amp

    # -- the loop
    from tqdm.auto import tqdm

    bar = tqdm(total=stop, initial=step, disable=not (dist.main and sys.stderr.isatty()), unit="step")
    window: dict[str, torch.Tensor] = {}
    window_steps, window_start, data_seconds = 0, time.monotonic(), 0.0
    batches = iter(loader)
    while step < stop:
        t0 = time.monotonic()
        batch = next(batches).to(device)
        data_seconds += time.monotonic() - t0
        lrs = set_lr(optimizer, step, o)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = train_model(batch.images)
        losses = compute_losses(out.all_layer_mask_probs(), out.semantic_features, text_embeddings, batch.semantic,
                                batch.instance_masks, cfg.synthesis.ignore_index, o.ce_logit_scale)
        loss = total_loss(losses, o.loss_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if o.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        step += 1
        bar.update(1)
        for name, value in {**losses, "total": loss}.items():  # summed on device: no sync per step
            window[name] = window.get(name, 0.0) + value.detach().float()
        window_steps += 1

        if step % o.log_every == 0 or step == stop:
            means = _reduce_means(window, window_steps, dist)
            if not all(math.isfinite(v) for v in means.values()):
                raise FloatingPointError(f"non-finite loss at step {step}: {means}")
            seconds = (time.monotonic() - window_start) / window_steps
            record = {"step": step, **means, "lr": lrs, "seconds_per_step": seconds,
                      "data_seconds_per_step": data_seconds / window_steps, "eta_seconds": seconds * (stop - step)}
            bar.set_postfix(loss=f"{means['total']:.3f}")
            log(f"step {step}/{o.steps} | " + " | ".join(f"{k} {v:.4f}" for k, v in means.items())
                + f" | lr {lrs[1]:.2e}/{lrs[0]:.2e} | {seconds:.3f} s/step (data {record['data_seconds_per_step']:.3f})"
                + f" | ETA {_hms(record['eta_seconds'])}", record=record, out_dir=out_dir)
            window, window_steps, window_start, data_seconds = {}, 0, time.monotonic(), 0.0
        if dist.main and (step % o.checkpoint_every == 0 or step == stop):
            save_training_state(state_path, model, optimizer, step, extra={"config": cfg.to_dict()})
    bar.close()
    timings["train"], clock = round(time.monotonic() - clock, 1), time.monotonic()
    if dist.world_size > 1:  # leave the group before exporting: a long evaluation must not hit a collective timeout
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

    # -- export
    if step >= o.steps and dist.main:
        provenance = {"command": command, "git": git_commit(), "cwd": os.getcwd(),
                      "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "data": data.provenance,
                      "config": cfg.to_dict(), "steps": step, "world_size": dist.world_size,
                      "timings_seconds": timings}
        path = Path(cfg.export_path) if cfg.export_path else out_dir / "model.safetensors"
        path = export(path, model, text_tower, cfg, provenance, device, log)
        log(f"exported {path}")
    return 0


def _reduce_means(window: dict[str, torch.Tensor], steps: int, dist: Dist) -> dict[str, float]:
    names = sorted(window)
    values = torch.stack([window[n] for n in names]) / steps
    if dist.world_size > 1:
        torch.distributed.all_reduce(values)
        values /= dist.world_size
    return dict(zip(names, values.tolist()))


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _logger(dist: Dist):
    """Rank 0 prints to stdout and appends ``record`` (if given) to ``<out_dir>/log.jsonl``; other ranks stay
    silent."""

    def log(message: str, record: dict[str, Any] | None = None, out_dir: Path | None = None) -> None:
        if not dist.main:
            return
        print(message, flush=True)
        if record is not None and out_dir is not None:
            with open(out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    return log


if __name__ == "__main__":
    sys.exit(main())
