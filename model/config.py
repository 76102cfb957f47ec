"""Model and inference configuration: plain data (JSON + dataclasses), no behaviour beyond validation.

A ``ModelConfig`` fully describes a ZUTIS network: which open_clip architecture provides the encoder and the
text tower, how inputs are normalised, and the sizes of the mask decoder. It travels inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's input normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MASK_POSITIONS = (None, "sine")
CLIP_FIELDS = ("clip_model", "clip_config", "conv_stem")  # what builds the CLIP towers (model.backbone)
_OPT_IN_DEFAULTS = {"mask_position": None, "mask_stop_gradient": True}


def reject_unknown_keys(d: Mapping[str, Any], cls: type, what: str) -> None:
    """The rule every JSON config section of the project follows: a key that is not a field of the dataclass
    ``cls`` is an error (``ValueError: unknown <what>: [...]``), so that a typo never falls back to a default."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what}: {sorted(unknown)}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a ZUTIS model.

    Exactly one of ``clip_model`` (a registered open_clip name such as ``"ViT-B-16"``) and ``clip_config`` (an
    inline open_clip config dict with ``embed_dim``, ``vision_cfg``, ``text_cfg`` and optional ``quick_gelu``)
    must be set. ``conv_stem`` optionally replaces the ViT patch embedding with stride-2 3x3 convolutions whose
    output channels are listed (the last conv maps to the ViT width); its total stride must equal the patch size.

    Opt-in departures from the official mask branch (the defaults are the release's, and ``to_dict`` leaves a field
    out while it holds its default, so official configs, checkpoints and stage keys are unchanged):

    - ``mask_position``: ``None`` (official: the mask features ``M = ffn1(F_up)`` carry no explicit position, so two
      pixels with the same features always get the same mask probability) or ``"sine"``: the decoder's
      parameter-free sine positional encoding is added to ``M``, which is both the decoder memory and the pixel
      embedding the proposals are computed from (``sigmoid(<E_q, M + PE>)``).
    - ``mask_stop_gradient``: ``True`` (official: ``ffn1(F_up.detach())``, the mask loss never trains the encoder)
      or ``False``: the mask loss back-propagates into the encoder too.
    """

    clip_model: str | None = "ViT-B-16-quickgelu"
    clip_config: dict[str, Any] | None = None
    conv_stem: tuple[int, ...] | None = None
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    num_queries: int = 100
    decoder_layers: int = 6
    decoder_heads: int = 8
    decoder_ffn_dim: int = 2048
    ffn_hidden_dim: int = 256
    input_size: int = 384
    mask_position: str | None = None
    mask_stop_gradient: bool = True

    def __post_init__(self) -> None:
        if self.mask_position not in MASK_POSITIONS:
            raise ValueError(f"ModelConfig.mask_position must be one of {list(MASK_POSITIONS)}, "
                             f"got {self.mask_position!r}")
        if not isinstance(self.mask_stop_gradient, bool):
            raise ValueError(f"ModelConfig.mask_stop_gradient must be true or false, got {self.mask_stop_gradient!r}")
        if (self.clip_model is None) == (self.clip_config is None):
            raise ValueError("ModelConfig needs exactly one of clip_model and clip_config")
        if self.conv_stem is not None:
            object.__setattr__(self, "conv_stem", tuple(int(c) for c in self.conv_stem))
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))
        for name in ("num_queries", "decoder_layers", "decoder_heads", "decoder_ffn_dim", "ffn_hidden_dim",
                     "input_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.conv_stem is not None:
            patch = self.patch_size
            if 2 ** (len(self.conv_stem) + 1) != patch:
                raise ValueError(f"conv_stem {list(self.conv_stem)} makes {len(self.conv_stem) + 1} stride-2 convs, "
                                 f"which does not give the patch size {patch}")

    # -- derived views -------------------------------------------------------------------------------------
    def open_clip_config(self) -> dict[str, Any]:
        """The open_clip model config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``, ``quick_gelu``)."""
        if self.clip_config is not None:
            return json.loads(json.dumps(self.clip_config))
        import open_clip  # deferred: importing open_clip pulls in torchvision

        cfg = open_clip.get_model_config(self.clip_model)
        if cfg is None:
            raise ValueError(f"unknown open_clip architecture {self.clip_model!r}")
        return json.loads(json.dumps(cfg))

    def clip_architecture(self) -> dict[str, Any]:
        """The fields that define the CLIP towers alone (``CLIP_FIELDS``: ``clip_model``, ``clip_config``,
        ``conv_stem``), in ``to_dict`` form. What a CLIP-only computation (an image index, retrieval, CLIP
        pseudo-mask features) depends on, so that a change to the ZUTIS decoder or heads leaves it alone;
        ``ModelConfig.from_dict`` of it builds the same towers."""
        d = self.to_dict()
        return {k: d[k] for k in CLIP_FIELDS}

    @property
    def patch_size(self) -> int:
        return int(self.open_clip_config()["vision_cfg"]["patch_size"])

    @property
    def vision_width(self) -> int:
        return int(self.open_clip_config()["vision_cfg"]["width"])

    @property
    def embed_dim(self) -> int:
        return int(self.open_clip_config()["embed_dim"])

    # -- serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("conv_stem", "image_mean", "image_std"):
            if d[k] is not None:
                d[k] = list(d[k])
        for k, default in _OPT_IN_DEFAULTS.items():  # absent at the official default: keys and hashes unchanged
            if d[k] == default:
                del d[k]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        reject_unknown_keys(d, cls, "ModelConfig field(s)")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class InferenceParams:
    """Post-processing knobs (reference §3.3-3.4). Defaults are the official release's.

    ``score_threshold`` is both the NMS score floor and the minimum score of a returned instance.
    """

    mask_threshold: float = 0.5
    temperature: float = 5.0
    nms_iou: float = 0.3
    score_threshold: float = 0.001
    max_instances: int = 100

    def __post_init__(self) -> None:
        checks = {
            "mask_threshold": 0.0 <= self.mask_threshold < 1.0,
            "temperature": math.isfinite(self.temperature) and self.temperature > 0.0,
            "nms_iou": 0.0 <= self.nms_iou <= 1.0,
            "score_threshold": 0.0 <= self.score_threshold <= 1.0,
            "max_instances": isinstance(self.max_instances, int) and self.max_instances >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError("invalid inference parameter(s): " + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad))

    def with_overrides(self, **overrides: Any) -> "InferenceParams":
        """A copy with the given non-None fields replaced; unknown names raise ``ValueError``."""
        reject_unknown_keys(overrides, type(self), "inference parameter(s)")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InferenceParams":
        return cls().with_overrides(**d)


def tiny_test_config(**overrides: Any) -> ModelConfig:
    """A randomly-initialisable model small enough for CPU unit tests (a few hundred thousand parameters)."""
    clip_config = {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 48, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    base: dict[str, Any] = dict(clip_model=None, clip_config=clip_config, num_queries=10, decoder_layers=2,
                                decoder_heads=2, decoder_ffn_dim=64, ffn_hidden_dim=32, input_size=64)
    base.update(overrides)
    return ModelConfig(**base)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "CLIP_MEAN", "CLIP_STD", "CLIP_FIELDS", "reject_unknown_keys",
           "ModelConfig", "InferenceParams", "tiny_test_config"]
