"""The training config: JSON -> frozen dataclasses, checked before any work.

Unknown keys are errors (``model.config.reject_unknown_keys``), so a typo never silently falls back to a default.
A file may extend another and state only its changes (``"extends"``: ``model.training.config_files``).
A ``world`` section (the shapes world) fills in the paths its stages build (``with_world``, ``with_oracle_scenes``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from model.config import InferenceParams, ModelConfig, reject_unknown_keys
from model.training.config_files import read_config
from model.training.copy_paste import SynthesisParams
from model.training.shapes import oracle as scene_oracle
from model.training.shapes.oracle import LABELLINGS, labelling_vocabulary
from model.training.shapes.world import ShapesWorld
from model.training.stage_cache import run_stage
from model.training.stages import DataConfig, World, WorldConfig, validate_data_inputs
from model.vocabularies import load_vocabulary


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
    # opt-in: bf16 autocast on CPU too (worth it only on CPUs with native bf16: model.dtypes.native_bf16_feature)
    cpu_amp: bool = False
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
    (``model.shapes.oracle``). The ladder's R0 / R2 rungs (experiments/shapes/ladder-r0.md)."""

    scenes: int = 2000
    seed: int = 3
    labels: str = "colour"

    def __post_init__(self) -> None:
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
        reject_unknown_keys(d, cls, "key(s) in config")
        model = ModelConfig.from_dict(d["model"])
        world = _section(WorldConfig, d["world"], "world") if d.get("world") else None
        if world is None and "clip_weights" not in d:
            raise ValueError("config needs 'clip_weights' (or a 'world' section that pre-trains one)")
        oracle = _section(OracleScenesConfig, d["oracle_scenes"], "oracle_scenes") if d.get("oracle_scenes") else None
        if oracle is not None:
            if world is None:
                raise ValueError("oracle_scenes needs a 'world' section (its validation and test scenes)")
            if oracle.seed in (world.val_seed, world.test_seed):
                raise ValueError(f"oracle_scenes.seed {oracle.seed} is the seed of the validation or test scenes: "
                                 "training scenes must never be evaluation scenes")
            d.setdefault("vocabulary", labelling_vocabulary(oracle.labels))
            d.setdefault("export_vocabulary", labelling_vocabulary(oracle.labels))
        vocab = d.get("vocabulary") or (ShapesWorld().split_names(world.train_split) if world else None)
        if vocab is None:
            raise ValueError("config needs 'vocabulary' (or a 'world' section whose split provides it)")
        if isinstance(vocab, str):
            vocab = load_vocabulary(vocab)
        vocab = [v for v in vocab if v != "background"]
        if not vocab or len(set(vocab)) != len(vocab):
            raise ValueError("config 'vocabulary' must be a non-empty list of distinct concepts (or a shipped name)")
        synth = dict(d.get("synthesis", {}))
        synth.setdefault("crop_size", model.input_size)
        synth.setdefault("image_mean", model.image_mean)
        synth.setdefault("image_std", model.image_std)
        data = _section(DataConfig, d.get("data", {}), "data")
        export_vocab = d.get("export_vocabulary") or (ShapesWorld().split_names("all") if world else None)
        if d.get("export_dtype", "float32") not in EXPORT_DTYPES:
            raise ValueError(f"export_dtype must be one of {sorted(EXPORT_DTYPES)}, got {d['export_dtype']!r}")
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


EXPORT_DTYPES = {"float32": None, "float16": torch.float16}


def with_world(cfg: TrainConfig, world: World) -> TrainConfig:
    """``cfg`` with the paths the world's stages built: CLIP, index (and its truth for ``masks: "truth"``), the
    test scenes as ``eval`` (with seen/unseen subsets) and the validation scenes as ``val``; of the config's own
    ``eval`` / ``val`` sections only ``max_images``, ``score_threshold`` and ``class_agnostic`` are kept."""
    data = dataclasses.replace(
        cfg.data, index_dirs=(str(world.index_images),),
        # absolute, as the retrieval lists (model.index records absolute paths): the oracle's masks are keyed by it
        ground_truth={"annotations": str(world.index_truth), "image_dir": os.path.abspath(world.index_images)}
        if cfg.world.masks == "truth" else cfg.data.ground_truth)
    subsets = {s: ShapesWorld().split_names(s) for s in ("seen", "unseen")}

    def scenes(folder: Path, given: EvalConfig | None, **kw: Any) -> EvalConfig:
        return EvalConfig(image_dir=str(folder / "images"), annotations=str(folder / "instances.json"),
                          label_dir=str(folder / "labels"),
                          **({"max_images": given.max_images, "score_threshold": given.score_threshold,
                              "class_agnostic": given.class_agnostic} if given else {}), **kw)

    return dataclasses.replace(cfg, clip_weights=str(world.clip_weights), data=data,
                               eval=scenes(world.test_dir, cfg.eval, subsets=subsets),
                               val=scenes(world.val_dir, cfg.val))


def with_oracle_scenes(cfg: TrainConfig, cache_dir: Path, log: Callable[[str], None]) -> TrainConfig:
    """``cfg`` (already ``with_world``) training on rendered scenes with true masks and labels (``oracle_scenes``):
    a cached stage renders and labels them; eval / val become the relabelled test / validation scenes."""
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


def _section(cls: type, d: dict[str, Any], where: str) -> Any:
    reject_unknown_keys(d, cls, f"key(s) in {where}")
    return cls(**d)


def load_config(path: str | Path, steps: int | None = None) -> TrainConfig:
    """The training config at ``path`` (``extends`` resolved: ``model.training.config_files``), checked; ``steps``
    overrides ``optim.steps``. A ``ValueError`` names the file."""
    d = read_config(path)
    if steps is not None:
        d.setdefault("optim", {})["steps"] = steps
    try:
        return TrainConfig.from_dict(d)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def validate_inputs(cfg: TrainConfig) -> None:
    """Check every file and folder the run will read, and the settings that could only fail later."""
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


__all__ = ["OptimConfig", "EvalConfig", "OracleScenesConfig", "TrainConfig", "EXPORT_DTYPES",
           "with_world", "with_oracle_scenes", "load_config", "validate_inputs"]
