"""The data stages of ``model.train``: what each stage computes and what its cache key is made of.

``prepare_training_data`` runs the ZUTIS chain (index -> retrieval -> pseudo-masks, or ground-truth masks) from a
``DataConfig`` and gathers what ``CopyPasteDataset`` needs (``TrainingData``); ``validate_data_inputs`` checks its
files up front; ``clip_normalisation`` reads the normalisation a CLIP file's index must use. ``prepare_world``
builds what a run "from nothing" starts with (``WorldConfig``: the shapes world's unlabelled index, validation and
test scenes, and its tiny CLIP pre-trained on all concepts). Every stage is cached by
``model.training.stage_cache`` under a key of its inputs (the dicts built here: ``index_stage_inputs``,
``retrieval_stage_inputs``, ``pseudo_mask_stage_inputs``). A stage is keyed on what it reads: the CLIP stages on
the CLIP's own architecture fields, never on the ZUTIS decoder or heads, so a head-only change reuses them; caches
built under the older keys (which held the whole ModelConfig) are adopted, not rebuilt.

Fingerprints: a file is hashed by content (SHA-256); an image folder by the sorted list of its files' relative
paths, sizes and modification times (hashing the content of millions of images would take longer than the stage).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import safe_open

from model.checkpoint import file_sha256
from model.clip_weights import load_clip
from model.config import CLIP_MEAN, CLIP_STD, ModelConfig
from model.training.annotations import annotations_from_coco, annotations_from_pseudo_masks
from model.training.config_files import read_config
from model.training.files import folder_fingerprint
from model.training.index import build_index
from model.training.prompts import PROMPT_TEMPLATES
from model.training.pseudo_masks.features import EXTRACTOR_NAMES, build_extractors
from model.training.pseudo_masks.shards import generate_pseudo_masks, load_pseudo_masks
from model.training.retrieve import retrieve
from model.training.shapes.clip_pretrain import pretrain_clip
from model.training.shapes.dataset import write_eval_scenes, write_index
from model.training.stage_cache import run_or_wait_for_stage, run_stage, stage_key

_PSEUDO_MASK_KEYS = {"extractors", "dino_weights", "moco_weights", "ks", "max_tokens", "max_mask_side", "n_init",
                     "seed", "shard_size"}


@dataclass(frozen=True)
class DataConfig:
    """Where the training images and their masks come from (the ``data`` section of a training config).

    Images: build the stages (``index_dirs`` searched recursively, embedded with ``retrieval_clip_weights``), or
    give ``retrieval_file``, a finished ``{concept: [image paths]}`` JSON (the authors ship theirs). Masks:
    ``pseudo_mask_dir`` (finished), else generated with ``pseudo_masks`` (``extractors``: names from
    ``model.training.pseudo_masks.features.EXTRACTOR_NAMES``, default ``["colour"]``; ``dino_weights`` /
    ``moco_weights`` files; other keys go to ``generate_pseudo_masks``; the "clip" extractor uses the retrieval CLIP); or ``ground_truth``
    (``{"annotations": COCO instances JSON, "image_dir": folder}``) in place of pseudo-masks (the "oracle").
    Retrieved images without a mask (a pseudo-mask failed, or absent from the ground truth) are left out.
    """

    index_dirs: tuple[str, ...] = ()
    retrieval_clip_weights: str | None = None  # default: the model's own CLIP weights
    retrieval_clip_model: dict[str, Any] | None = None  # ModelConfig of an OpenAI/open_clip retrieval file
    retrieval_n: int = 500
    retrieval_templates: bool = True  # the 85 DenseCLIP templates (reference §5.1); False: raw names
    retrieval_file: str | None = None
    pseudo_mask_dir: str | None = None
    pseudo_masks: dict[str, Any] = field(default_factory=dict)
    ground_truth: dict[str, str] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "index_dirs", tuple(str(d) for d in self.index_dirs))
        if self.ground_truth is not None and set(self.ground_truth) != {"annotations", "image_dir"}:
            raise ValueError("data.ground_truth needs exactly the keys 'annotations' and 'image_dir'")
        unknown = set(self.pseudo_masks) - _PSEUDO_MASK_KEYS
        if unknown:
            raise ValueError(f"unknown key(s) in data.pseudo_masks: {sorted(unknown)}; "
                             f"known: {sorted(_PSEUDO_MASK_KEYS)}")
        if self.retrieval_n < 1:
            raise ValueError(f"data.retrieval_n must be positive, got {self.retrieval_n}")


@dataclass(frozen=True)
class WorldConfig:
    """A synthetic world built from nothing (the ``world`` section of a config; ``model.training.shapes``).

    Stages: an unlabelled index of ``index_images`` scenes (``shapes.dataset.write_index``, hidden truth
    beside it), ``val_scenes`` and ``test_scenes`` held-out evaluation scenes with 1-8 objects (separate seeds,
    so disjoint random streams; validation picks the exported score threshold, test gives the reported
    metrics), and a tiny CLIP pre-trained on all concepts with the recipe ``clip_recipe`` (its ``minutes`` or
    ``steps`` overridden by ``clip_minutes`` / ``clip_steps``, ``steps`` winning), or, with ``clip_weights``, a
    finished CLIP file (``python -m model.shapes.clip_pretrain``'s output, e.g. the shipped
    ``weights/zutis-shapes-clip.safetensors``) used as it is, as ZUTIS uses OpenAI's CLIP. ``train_split`` ("seen" or
    "all") picks the training concepts; ``masks`` "pseudo" (the method) or "truth" (the oracle: the index's
    generator masks in place of pseudo-masks). Images are ``scene_size`` px squares.
    """

    clip_recipe: str | None = None
    clip_weights: str | None = None
    clip_minutes: float | None = None
    clip_steps: int | None = None
    clip_seed: int = 0
    index_images: int = 6000
    index_seed: int = 0
    val_scenes: int = 200
    val_seed: int = 1
    test_scenes: int = 500
    test_seed: int = 2
    scene_size: int = 128
    train_split: str = "seen"
    masks: str = "pseudo"

    def __post_init__(self) -> None:
        if self.train_split not in ("seen", "all"):
            raise ValueError(f"world.train_split must be 'seen' or 'all', got {self.train_split!r}")
        if self.masks not in ("pseudo", "truth"):
            raise ValueError(f"world.masks must be 'pseudo' or 'truth', got {self.masks!r}")
        if min(self.index_images, self.val_scenes, self.test_scenes) < 1:
            raise ValueError("world.index_images, val_scenes and test_scenes must be positive")
        if (self.clip_recipe is None) == (self.clip_weights is None):
            raise ValueError("world: give exactly one of clip_recipe (pre-train a CLIP) and clip_weights (a finished "
                             "CLIP file)")
        if self.clip_weights is not None:
            if not Path(self.clip_weights).is_file():
                raise FileNotFoundError(f"world.clip_weights: file not found: {self.clip_weights} (make it with "
                                        "python -m model.shapes.clip_pretrain)")
        elif not Path(self.clip_recipe).is_file():
            raise FileNotFoundError(f"world.clip_recipe: file not found: {self.clip_recipe}")


@dataclass(frozen=True)
class World:
    """The paths ``prepare_world`` built: CLIP file, index images + hidden truth, val/test scene folders (each
    with ``images/``, ``labels/`` and ``instances.json``)."""

    clip_weights: Path
    index_images: Path
    index_truth: Path
    val_dir: Path
    test_dir: Path


def prepare_world(world: WorldConfig, cache_dir: str | Path, log: Callable[[str], None] = print) -> World:
    """Run (or reuse) the world's four stages; each is keyed by its own parameters only (the renderer is code:
    a change to it needs a new cache directory). The CLIP stage is keyed by the recipe's content (with the recipes
    it extends resolved) and the content of the CLIP file it starts from, if any."""
    cache_dir = Path(cache_dir)
    size = world.scene_size
    index = run_stage(cache_dir, "shapes_index", {"n": world.index_images, "seed": world.index_seed, "size": size},
                      lambda out: write_index(out, world.index_images, world.index_seed, size=size), log)
    scenes = {}
    for split, n, seed in (("val", world.val_scenes, world.val_seed), ("test", world.test_scenes, world.test_seed)):
        scenes[split] = run_stage(cache_dir, f"shapes_{split}", {"n": n, "seed": seed, "size": size},
                                  lambda out, n=n, seed=seed: write_eval_scenes(out, n, seed, size=size), log)
    if world.clip_weights is not None:
        return World(Path(world.clip_weights), index / "images", index / "truth" / "instances.json", scenes["val"],
                     scenes["test"])
    recipe = read_config(world.clip_recipe)  # resolved: a change to the recipe it extends changes the key too
    clip_inputs = {"recipe": recipe, "minutes": world.clip_minutes, "steps": world.clip_steps,
                   "seed": world.clip_seed}
    if recipe.get("init_clip"):
        clip_inputs["init_clip_sha256"] = file_sha256(recipe["init_clip"])

    def build_clip(out: Path) -> None:
        pretrain_clip(world.clip_recipe, out / "clip.safetensors", minutes=world.clip_minutes,
                      steps=world.clip_steps, seed=world.clip_seed, log=log)

    clip_dir = run_stage(cache_dir, "shapes_clip", clip_inputs, build_clip, log)
    return World(clip_dir / "clip.safetensors", index / "images", index / "truth" / "instances.json",
                 scenes["val"], scenes["test"])


@dataclass
class TrainingData:
    """retrieval ``{concept: [paths]}``; annotations ``{path: [annotations.Instance]}``; provenance for export."""

    retrieval: dict[str, list[str]]
    annotations: dict[str, list[Any]]
    provenance: dict[str, Any]


def validate_data_inputs(data: DataConfig, clip_weights: str) -> None:
    """Raise ``FileNotFoundError`` naming the first missing file or folder the data stages will read."""
    files: list[tuple[str, str]] = []
    dirs: list[tuple[str, str]] = []
    if data.retrieval_file:
        files.append(("data.retrieval_file", data.retrieval_file))
    else:
        if not data.index_dirs:
            raise ValueError("config: give data.retrieval_file or data.index_dirs to retrieve training images from")
        dirs += [("data.index_dirs", d) for d in data.index_dirs]
        files.append(("data.retrieval_clip_weights", data.retrieval_clip_weights or clip_weights))
    if data.ground_truth:
        files.append(("data.ground_truth.annotations", data.ground_truth["annotations"]))
        dirs.append(("data.ground_truth.image_dir", data.ground_truth["image_dir"]))
    elif data.pseudo_mask_dir:
        dirs.append(("data.pseudo_mask_dir", data.pseudo_mask_dir))
    else:
        names = data.pseudo_masks.get("extractors", ["colour"])
        bad = [n for n in names if n not in EXTRACTOR_NAMES]
        if bad or not names:
            raise ValueError(f"data.pseudo_masks.extractors {names}: choose from {', '.join(EXTRACTOR_NAMES)}")
        for name in ("dino", "moco"):
            if name in names:
                if not data.pseudo_masks.get(f"{name}_weights"):
                    raise ValueError(f"the {name} extractor needs data.pseudo_masks.{name}_weights")
                files.append((f"data.pseudo_masks.{name}_weights", data.pseudo_masks[f"{name}_weights"]))
        if "clip" in names and data.retrieval_file and not data.retrieval_clip_weights:
            files.append(("clip_weights (for the clip extractor)", clip_weights))
    for what, p in files:
        if not Path(p).is_file():
            raise FileNotFoundError(f"{what}: file not found: {p}")
    for what, p in dirs:
        if not Path(p).is_dir():
            raise FileNotFoundError(f"{what}: folder not found: {p}")


def prepare_training_data(data: DataConfig, vocabulary: Sequence[str], clip_weights: str, model_config: ModelConfig,
                          cache_dir: str | Path, device: torch.device, is_main: bool = True,
                          log: Callable[[str], None] = print) -> TrainingData:
    """Run (or reuse) index -> retrieval -> pseudo-masks and gather what ``CopyPasteDataset`` needs.

    ``vocabulary``: training concepts without "background". ``is_main`` False (torchrun ranks > 0) waits for
    rank 0's stages instead of building them.
    """
    cache_dir = Path(cache_dir)
    provenance: dict[str, Any] = {}
    if data.retrieval_file:
        raw = json.loads(Path(data.retrieval_file).read_text())
        provenance["retrieval_file"] = {"path": str(data.retrieval_file), "sha256": file_sha256(data.retrieval_file)}
    else:
        retrieval_dir = _retrieval_stages(data, vocabulary, clip_weights, model_config, cache_dir, device,
                                          is_main, log)
        raw = json.loads((retrieval_dir / "retrieval.json").read_text())
        provenance["retrieval_stage"] = str(retrieval_dir)
    if not isinstance(raw, dict):
        raise ValueError("the retrieval JSON must map each concept to a list of image paths")
    retrieval = {c: [str(p) for p in raw.get(c, [])] for c in vocabulary}
    if data.ground_truth:
        annotations = annotations_from_coco(data.ground_truth["annotations"],
                                            data.ground_truth["image_dir"], vocabulary)
        provenance["masks"] = {"ground_truth": dict(data.ground_truth),
                               "sha256": file_sha256(data.ground_truth["annotations"])}
    else:
        mask_dir = Path(data.pseudo_mask_dir) if data.pseudo_mask_dir else \
            _pseudo_mask_stage(data, retrieval, clip_weights, model_config, cache_dir, device, is_main, log)
        annotations = annotations_from_pseudo_masks(load_pseudo_masks(mask_dir))
        provenance["masks"] = {"pseudo_mask_dir": str(mask_dir)}
    missing = sorted({p for paths in retrieval.values() for p in paths if p not in annotations})
    if missing:
        log(f"warning: {len(missing)} retrieved image(s) have no mask and are left out, e.g. {missing[0]}")
        retrieval = {c: [p for p in paths if p in annotations] for c, paths in retrieval.items()}
    empty = [c for c, paths in retrieval.items() if not paths]
    if empty:
        log(f"warning: {len(empty)} concept(s) have no training images, e.g. {empty[:3]}")
    provenance["images"] = len({p for paths in retrieval.values() for p in paths})
    provenance["images_without_mask"] = len(missing)
    return TrainingData(retrieval, annotations, provenance)


def index_stage_inputs(data: DataConfig, clip_weights: str, model_config: ModelConfig) -> dict[str, Any]:
    """What the index stage is keyed on: the image folders' fingerprints, the retrieval CLIP file's content, the
    CLIP's own architecture fields (``ModelConfig.clip_architecture``: never the ZUTIS decoder or heads) and, for a
    CLIP trained with another normalisation, that normalisation."""
    weights, arch = _retrieval_clip(data, clip_weights, model_config)
    mean, std = clip_normalisation(weights)
    inputs = {"image_dirs": {d: folder_fingerprint(d) for d in data.index_dirs},
              "clip_weights": file_sha256(weights), "clip_model": arch}
    if (mean, std) != (CLIP_MEAN, CLIP_STD):  # only then, so that existing index caches keep their keys
        inputs["normalisation"] = {"mean": list(mean), "std": list(std)}
    return inputs


def retrieval_stage_inputs(data: DataConfig, vocabulary: Sequence[str], index_inputs: dict[str, Any]
                           ) -> dict[str, Any]:
    """What the retrieval stage is keyed on: the index stage's key, the concepts, ``retrieval_n`` and the templates."""
    return {"index": stage_key(index_inputs), "concepts": list(vocabulary), "n": data.retrieval_n,
            "templates": data.retrieval_templates}


def pseudo_mask_stage_inputs(data: DataConfig, paths: Sequence[str], clip_weights: str, model_config: ModelConfig
                             ) -> dict[str, Any]:
    """What the pseudo-mask stage is keyed on: the image paths, the extractors, their options and weight files, and
    (only with the "clip" extractor) the retrieval CLIP's file and own architecture fields."""
    names, options, weights = _pseudo_mask_options(data)
    clip_file, clip_arch = _retrieval_clip(data, clip_weights, model_config)
    return {"images": stage_key({"paths": list(paths)}), "extractors": names, "options": options,
            **{k: file_sha256(v) for k, v in weights.items() if v},
            **({"clip_weights": file_sha256(clip_file), "clip_model": clip_arch} if "clip" in names else {})}


def _pseudo_mask_options(data: DataConfig) -> tuple[list[str], dict[str, Any], dict[str, str | None]]:
    """``data.pseudo_masks`` split as the stage reads it, and so keys it: the extractor names, their options, and
    the DINO / MoCo weight files."""
    options = dict(data.pseudo_masks)
    names = list(options.pop("extractors", ["colour"]))
    weights = {k: options.pop(k, None) for k in ("dino_weights", "moco_weights")}
    return names, options, weights


def _legacy(inputs: dict[str, Any], data: DataConfig, model_config: ModelConfig) -> dict[str, Any]:
    """``inputs`` as the stage was keyed before it keyed on the CLIP's own fields: with the whole ModelConfig (or
    the retrieval file's architecture dict as given) as ``clip_model``. Only to adopt caches built under those keys;
    a stage that does not read the CLIP (no ``clip_model``) is unchanged."""
    if "clip_model" not in inputs:
        return inputs
    old = data.retrieval_clip_model if data.retrieval_clip_weights else model_config.to_dict()
    return {**inputs, "clip_model": old}


def _retrieval_stages(data: DataConfig, vocabulary: Sequence[str], clip_weights: str, model_config: ModelConfig,
                      cache_dir: Path, device: torch.device, is_main: bool, log: Callable[[str], None]) -> Path:
    """index -> retrieval, each cached by content key; returns the retrieval stage directory."""
    weights, arch = _retrieval_clip(data, clip_weights, model_config)
    mean, std = clip_normalisation(weights)
    index_inputs = index_stage_inputs(data, clip_weights, model_config)
    retrieval_inputs = retrieval_stage_inputs(data, vocabulary, index_inputs)
    old_index = _legacy(index_inputs, data, model_config)
    old_retrieval = retrieval_stage_inputs(data, vocabulary, old_index)

    def clip() -> Any:
        return _load_clip(weights, arch, device)

    def build_index_stage(out: Path) -> None:
        build_index(list(data.index_dirs), clip(), out, model_id=Path(weights).name, mean=mean, std=std)

    def build_retrieval(out: Path) -> None:
        templates = list(PROMPT_TEMPLATES) if data.retrieval_templates else ["{}"]
        result = retrieve(index_dir, list(vocabulary), clip(), n=data.retrieval_n, templates=templates)
        (out / "retrieval.json").write_text(json.dumps(result))

    index_dir = run_or_wait_for_stage(cache_dir, "index", index_inputs, build_index_stage, is_main, log,
                                      legacy=[old_index])
    return run_or_wait_for_stage(cache_dir, "retrieval", retrieval_inputs, build_retrieval, is_main, log,
                                 legacy=[old_retrieval])


def _pseudo_mask_stage(data: DataConfig, retrieval: dict[str, list[str]], clip_weights: str,
                       model_config: ModelConfig, cache_dir: Path, device: torch.device, is_main: bool,
                       log: Callable[[str], None]) -> Path:
    """The pseudo-mask stage over every retrieved image (``pseudo_mask_stage_inputs``); returns its directory."""
    paths = sorted({p for ps in retrieval.values() for p in ps})
    names, options, weights = _pseudo_mask_options(data)
    clip_file, clip_arch = _retrieval_clip(data, clip_weights, model_config)
    inputs = pseudo_mask_stage_inputs(data, paths, clip_weights, model_config)
    old = _legacy(inputs, data, model_config)

    def build(out: Path) -> None:
        visual = _load_clip(clip_file, clip_arch, device).visual if "clip" in names else None
        extractors = build_extractors(names, clip_visual=visual, device=device, **weights)
        generate_pseudo_masks(paths, extractors, out, **options)

    return run_or_wait_for_stage(cache_dir, "pseudo_masks", inputs, build, is_main, log, legacy=[old])


def clip_normalisation(path: str | Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel (mean, std) a CLIP file was trained with, which its index must use too: our own CLIP
    files (``zutis-clip/1`` safetensors, e.g. the shapes world's, pre-trained on inputs normalised with their
    ModelConfig's ``image_mean`` / ``image_std``) carry theirs; OpenAI / open_clip files use CLIP's."""
    if Path(path).suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") == "zutis-clip/1" and "model_config" in meta:
            config = ModelConfig.from_json(meta["model_config"])
            return tuple(config.image_mean), tuple(config.image_std)
    return tuple(CLIP_MEAN), tuple(CLIP_STD)


def _retrieval_clip(data: DataConfig, clip_weights: str, model_config: ModelConfig) -> tuple[str, dict | None]:
    """The CLIP file used for retrieval (and the clip pseudo-mask extractor) and its architecture: the CLIP's own
    fields (``ModelConfig.clip_architecture``), or None for a file that carries its own."""
    if data.retrieval_clip_weights:
        arch = data.retrieval_clip_model
        return data.retrieval_clip_weights, ModelConfig.from_dict(arch).clip_architecture() if arch else None
    return clip_weights, model_config.clip_architecture()


def _load_clip(path: str, arch: dict[str, Any] | None, device: torch.device) -> Any:
    towers = load_clip(path, ModelConfig.from_dict(arch) if arch else None)
    towers.visual.to(device)
    towers.text.to(device)
    return towers


__all__ = ["DataConfig", "WorldConfig", "World", "prepare_world", "TrainingData", "prepare_training_data",
           "validate_data_inputs", "clip_normalisation", "index_stage_inputs", "retrieval_stage_inputs",
           "pseudo_mask_stage_inputs"]
