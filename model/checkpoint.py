"""The one checkpoint format: a safetensors file with every tensor the service needs, plus JSON metadata.

Tensors: ``zutis.*`` (the network: encoder, heads, decoder; official key names after the prefix) and ``text.*``
(the CLIP text tower). Metadata (safetensors ``__metadata__``, string values holding JSON): ``format``,
``model_id``, ``model_config``, ``vocabulary`` (the model's default concepts, background first: those it was
trained on and, for a zero-shot model, those held out of training and only evaluated), ``inference`` (default
post-processing parameters), ``input_size`` (inference letterbox size, or the longer-side cap in native
geometry), ``geometry`` (the default geometry policy, ``letterbox`` or ``native``; absent in older files, which
mean ``letterbox``), ``trained_concepts`` (the concepts training saw; absent in older files, whose training
configuration in the provenance says it), ``prompt_templates`` and ``provenance`` (command, git commit, date, data,
config, metrics). Loading never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from model.clip_weights import load_state_strict
from model.config import InferenceParams, ModelConfig
from model.geometry import check_geometry
from model.network import ZUTIS
from model.text import TextEncoder

FORMAT = "zutis-checkpoint/1"


@dataclass(frozen=True)
class ConceptSplit:
    """A checkpoint's default concepts by what training saw: ``trained`` (in training order) and
    ``evaluated_only`` (held out of training, in vocabulary order); ``source`` names where the split was read."""

    trained: list[str]
    evaluated_only: list[str]
    source: str


@dataclass
class CheckpointMetadata:
    """Everything about a model that is not a tensor."""

    model_id: str
    model_config: ModelConfig
    vocabulary: list[str]
    inference: InferenceParams = field(default_factory=InferenceParams)
    input_size: int | None = None  # None: the training input size of the model config
    prompt_templates: list[str] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    geometry: str | None = None  # None: "letterbox" (checkpoints written before the field existed)
    trained_concepts: list[str] | None = None  # None: not stored (see concept_split)

    def __post_init__(self) -> None:
        if self.geometry is not None:
            check_geometry(self.geometry)

    @property
    def inference_input_size(self) -> int:
        return int(self.input_size or self.model_config.input_size)

    @property
    def inference_geometry(self) -> str:
        """The default geometry policy: the stored one, else ``letterbox``."""
        return self.geometry or "letterbox"

    def concept_split(self) -> ConceptSplit | None:
        """The default concepts (``vocabulary`` less background) split into those the model was trained on and
        those it was not (held out, only evaluated); None when the checkpoint does not say (converted official
        weights, tests' random checkpoints).

        The stored ``trained_concepts`` when present; else, for checkpoints written before that field, the
        training configuration recorded in the provenance (``provenance["config"]["vocabulary"]``, the concepts
        ``model.train`` labelled and trained on; ``vocabulary`` is its ``export_vocabulary``).
        """
        trained, source = self.trained_concepts, "trained_concepts"
        if trained is None:
            config = self.provenance.get("config")
            stored = config.get("vocabulary") if isinstance(config, dict) else None
            if isinstance(stored, list) and stored and all(isinstance(name, str) for name in stored):
                trained, source = stored, "provenance.config.vocabulary"
        if trained is None:
            return None
        seen = {*trained, "background"}
        return ConceptSplit(trained=[name for name in trained if name != "background"],
                            evaluated_only=[name for name in self.vocabulary if name not in seen], source=source)

    def to_strings(self) -> dict[str, str]:
        strings = {
            "format": FORMAT,
            "model_id": self.model_id,
            "model_config": self.model_config.to_json(),
            "vocabulary": json.dumps(self.vocabulary),
            "inference": json.dumps(self.inference.to_dict(), sort_keys=True),
            "input_size": json.dumps(self.input_size),
            "prompt_templates": json.dumps(self.prompt_templates),
            "provenance": json.dumps(self.provenance, sort_keys=True, default=str),
        }
        if self.geometry is not None:  # written only when set: files stay byte-identical otherwise
            strings["geometry"] = json.dumps(self.geometry)
        if self.trained_concepts is not None:  # likewise
            strings["trained_concepts"] = json.dumps(self.trained_concepts)
        return strings

    @classmethod
    def from_strings(cls, meta: dict[str, str], source: str = "checkpoint") -> "CheckpointMetadata":
        if meta.get("format") != FORMAT:
            raise ValueError(f"{source}: not a zutis checkpoint (format {meta.get('format')!r}, "
                             f"expected {FORMAT!r}); convert official files with python -m model.convert_official")
        try:
            return cls(
                model_id=meta["model_id"],
                model_config=ModelConfig.from_json(meta["model_config"]),
                vocabulary=json.loads(meta["vocabulary"]),
                inference=InferenceParams.from_dict(json.loads(meta["inference"])),
                input_size=json.loads(meta.get("input_size", "null")),
                prompt_templates=json.loads(meta.get("prompt_templates", "null")),
                provenance=json.loads(meta.get("provenance", "{}")),
                geometry=json.loads(meta.get("geometry", "null")),
                trained_concepts=json.loads(meta.get("trained_concepts", "null")),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{source}: malformed checkpoint metadata ({exc})") from exc


@dataclass
class LoadedCheckpoint:
    model: ZUTIS
    text_encoder: TextEncoder
    metadata: CheckpointMetadata
    sha256: str
    path: Path

    @property
    def checkpoint_id(self) -> str:
        """``model_id@<first 12 hex digits of the file's sha256>``: names exactly these weights."""
        return f"{self.metadata.model_id}@{self.sha256[:12]}"


def save_checkpoint(path: str | Path, model: ZUTIS, text_tower: nn.Module, metadata: CheckpointMetadata,
                    dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` + ``text_tower`` + ``metadata`` atomically (temporary file, then rename).

    ``dtype`` (e.g. ``torch.float16``) stores floating-point tensors in that precision to save space; they are
    loaded back as float32.
    """
    if metadata.model_config != model.config:
        raise ValueError("metadata.model_config differs from the model's own config")

    def prep(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.contiguous()

    tensors = {f"zutis.{k}": prep(v) for k, v in model.state_dict().items()}
    tensors.update({f"text.{k}": prep(v) for k, v in text_tower.state_dict().items() if k != "attn_mask"})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata.to_strings())
    tmp.replace(path)
    return path


def read_metadata(path: str | Path) -> CheckpointMetadata:
    """The metadata alone (cheap: reads the header, no tensors)."""
    path = _existing(path)
    with safe_open(str(path), framework="pt") as f:
        return CheckpointMetadata.from_strings(f.metadata() or {}, str(path))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Build the network and text encoder from ``path`` and load the weights (strict; float32; eval mode)."""
    path = _existing(path)
    metadata = read_metadata(path)
    tensors = load_file(str(path), device="cpu")
    model = ZUTIS(metadata.model_config)
    text = TextEncoder(metadata.model_config)
    _load_prefixed(model, tensors, "zutis.", path)
    _load_prefixed(text.tower, tensors, "text.", path)
    leftover = [k for k in tensors if not k.startswith(("zutis.", "text."))]
    if leftover:
        raise ValueError(f"{path}: unexpected tensors {leftover[:5]}")
    model.to(device).eval()
    text.to(device).eval()
    return LoadedCheckpoint(model, text, metadata, file_sha256(path), path)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 (hex) of a file's content: checkpoint ids, and the stage cache's record of its input files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return path


def _load_prefixed(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, path: Path) -> None:
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    load_state_strict(module, state, f"{path} ({prefix}*)")
