"""``ClipRecipe``: everything a shapes-world CLIP pre-training run depends on, with its validation and JSON form.

A recipe is a JSON file (``model/configs/shapes_clip.json`` is the shipped one) holding a ``ModelConfig`` (the
towers' architecture, whose vision ``image_size`` is the render size) and the run's knobs; unknown keys are
rejected. ``model.training.shapes.clip_pretrain`` runs it and stores it, as run, in the weight file's metadata.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.config import ModelConfig, reject_unknown_keys
from model.training.config_files import read_config


@dataclass(frozen=True)
class ClipRecipe:
    """Everything a pre-training run depends on. ``steps`` (if set) wins over ``minutes``.

    The image size is the vision tower's ``image_size``. ``objects_p[k]`` is the probability of ``k + 1`` objects
    in a non-empty image; ``empty_p`` that of a clutter-only image. ``train_split`` ("all" or "seen") restricts
    the concepts the CLIP ever sees (real CLIP saw everything; "seen" tests compositional generalisation).
    ``eval_every`` is in steps; evaluation uses ``eval_per_concept`` fresh single-object images per concept,
    the final one ``final_eval_per_concept``. ``dense_weight`` > 0 adds the dense patch-to-concept term
    (``dense_concept_loss``, soft maximum with temperature ``dense_tau``) with that weight; 0 is contrastive only.
    ``cpu_amp`` (opt-in) runs the towers' forward passes under bfloat16 autocast on CPU (the losses stay float32).
    ``init_clip`` (opt-in) starts from a saved CLIP file (this command's output) instead of random weights, e.g. a
    short 128-px phase after a 64-px run: its architecture must match ``model_config`` except the vision
    ``image_size``, whose positional embedding is re-interpolated to the new grid; the logit scales start afresh.
    """

    model_config: ModelConfig
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    minutes: float | None = 10.0
    steps: int | None = None
    objects_p: tuple[float, ...] = (0.8, 0.12, 0.08)
    empty_p: float = 0.05
    train_split: str = "all"
    pos_init: str = "sincos"
    grad_clip: float | None = None
    dense_weight: float = 0.0
    dense_tau: float = 10.0
    eval_every: int = 100
    eval_per_concept: int = 8
    final_eval_per_concept: int = 16
    threads: int = 2
    seed: int = 0
    cpu_amp: bool = False
    init_clip: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.model_config, dict):
            object.__setattr__(self, "model_config", ModelConfig.from_dict(self.model_config))
        object.__setattr__(self, "objects_p", tuple(float(p) for p in self.objects_p))
        if self.steps is None and self.minutes is None:
            raise ValueError("ClipRecipe needs steps or minutes")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")
        for name in ("batch_size", "eval_every", "eval_per_concept", "final_eval_per_concept", "threads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("a contrastive batch needs at least 2 images")
        if self.pos_init not in ("sincos", "random"):
            raise ValueError(f"pos_init must be 'sincos' or 'random', got {self.pos_init!r}")
        if self.train_split not in ("all", "seen"):
            raise ValueError(f"train_split must be 'all' or 'seen', got {self.train_split!r}")
        if not (self.dense_weight >= 0 and self.dense_tau > 0):
            raise ValueError(f"need dense_weight >= 0 and dense_tau > 0, got {self.dense_weight}, {self.dense_tau}")
        if not (self.lr > 0 and self.weight_decay >= 0 and self.warmup_steps >= 0):
            raise ValueError("need lr > 0, weight_decay >= 0 and warmup_steps >= 0")

    @property
    def image_size(self) -> int:
        """The render size in pixels: the vision tower's ``image_size``."""
        size = self.model_config.open_clip_config()["vision_cfg"]["image_size"]
        return int(size if isinstance(size, int) else size[0])

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``from_dict`` reads it back); the opt-in fields are left out at their defaults."""
        d = dataclasses.asdict(self)
        d["model_config"] = self.model_config.to_dict()
        d["objects_p"] = list(self.objects_p)
        for key, default in (("cpu_amp", False), ("init_clip", None)):
            if d[key] == default:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClipRecipe":
        """From the JSON form; unknown keys are rejected and ``model_config`` is required."""
        reject_unknown_keys(d, cls, "ClipRecipe field(s)")
        if "model_config" not in d:
            raise ValueError("a ClipRecipe needs a model_config")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "ClipRecipe":
        """Read a recipe JSON file (e.g. ``model/configs/shapes_clip.json``; ``extends`` resolved:
        ``model.training.config_files``). A ``ValueError`` names the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"CLIP recipe not found: {path}")
        d = read_config(path)  # its errors name the file already
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e


__all__ = ["ClipRecipe"]
