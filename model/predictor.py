"""The user-facing inference object: a loaded checkpoint on a device, answering ``predict(images, concepts)``.

Stateless and thread-safe: nothing about a call is stored on the object, and text embeddings go through an
explicit ``TextEmbeddingCache`` that the caller owns. The steps are public so that the service can batch them:
``prepare`` (per image, CPU) -> ``forward`` (one batched pass, the device) -> ``encode_concepts`` (per request,
cached) -> ``postprocess`` (per image).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from model.checkpoint import CheckpointMetadata, LoadedCheckpoint, load_checkpoint
from model.config import InferenceParams
from model.embedding_cache import TextEmbeddingCache
from model.geometry import Letterbox, preprocess_image
from model.network import ZUTISOutput
from model.postprocess import Prediction, postprocess
from model.text import build_vocabulary

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class PreparedImage:
    """One letterboxed image: ``tensor`` (3, S, S) float32 on the CPU, and where the image sits in it."""

    tensor: torch.Tensor
    letterbox: Letterbox


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when a GPU is visible, else ``cpu``; otherwise ``torch.device(device)`` checked."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """Compute precision: ``"auto"`` is float32 on CPU and float16 (autocast) on CUDA."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        resolved = torch.float16 if device.type == "cuda" else torch.float32
    elif dtype in _DTYPES:
        resolved = _DTYPES[dtype]
    else:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    if device.type == "cpu" and resolved != torch.float32:
        raise ValueError("only float32 is supported on CPU (reduced precision gave no speed-up there)")
    return resolved


class Predictor:
    """A checkpoint loaded on a device.

    ``predict(images, concepts, cache=None, semantic=True, **overrides) -> list[Prediction]``: images are PIL
    images or (H, W, 3) uint8 RGB arrays of any sizes; ``overrides`` are ``InferenceParams`` fields.
    """

    def __init__(self, loaded: LoadedCheckpoint, device: torch.device, dtype: torch.dtype,
                 input_size: int | None = None) -> None:
        # The fused MultiheadAttention fast path picks batch-size-dependent kernels; without it an image's
        # outputs are bitwise independent of its batch (tests/model/test_network.py). Process-wide setting.
        torch.backends.mha.set_fastpath_enabled(False)
        self._loaded = loaded
        self.device = device
        self.dtype = dtype
        self.input_size = int(input_size or loaded.metadata.inference_input_size)
        if self.input_size < loaded.metadata.model_config.patch_size:
            raise ValueError(f"input size {self.input_size} is smaller than one patch")
        self.model = loaded.model.to(device).eval()
        self.text_encoder = loaded.text_encoder.to(device).eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                        input_size: int | None = None) -> "Predictor":
        dev = resolve_device(device)
        return cls(load_checkpoint(path, "cpu"), dev, resolve_dtype(dtype, dev), input_size)

    # -- identity --------------------------------------------------------------------------------------------
    @property
    def metadata(self) -> CheckpointMetadata:
        return self._loaded.metadata

    @property
    def model_id(self) -> str:
        return self._loaded.checkpoint_id

    @property
    def sha256(self) -> str:
        return self._loaded.sha256

    @property
    def checkpoint_path(self) -> Path:
        return self._loaded.path

    @property
    def default_params(self) -> InferenceParams:
        return self.metadata.inference

    def params(self, **overrides: Any) -> InferenceParams:
        """The checkpoint's defaults with non-None ``overrides`` applied (``ValueError`` on bad values)."""
        return self.default_params.with_overrides(**overrides)

    # -- steps -----------------------------------------------------------------------------------------------
    def prepare(self, image: Any) -> PreparedImage:
        """Letterbox one image (PIL or (H, W, 3) uint8) into a normalised (3, S, S) CPU tensor."""
        cfg = self.metadata.model_config
        tensor, letterbox = preprocess_image(image, self.input_size, cfg.image_mean, cfg.image_std)
        return PreparedImage(tensor, letterbox)

    def forward(self, batch: Sequence[PreparedImage]) -> ZUTISOutput:
        """One batched forward pass; outputs are float32 on ``self.device``, image ``i`` at index ``i``."""
        if not batch:
            raise ValueError("forward needs at least one image")
        x = torch.stack([p.tensor for p in batch]).to(self.device, non_blocking=True)
        valid = torch.tensor([p.letterbox.valid_hw for p in batch])
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype,
                                                    enabled=self.dtype != torch.float32):
            out = self.model(x, valid)
        return ZUTISOutput(out.mask_probs.float(), out.semantic_features.float())

    def encode_concepts(self, concepts: Sequence[str],
                        cache: TextEmbeddingCache | None = None) -> tuple[list[str], torch.Tensor]:
        """The vocabulary (background first, normalised, deduplicated) and its (C, E) unit-norm embeddings."""
        vocabulary = build_vocabulary(concepts)
        templates = self.metadata.prompt_templates
        if cache is None:
            return vocabulary, self._encode_text(vocabulary)
        return vocabulary, cache.get_many(self.model_id, templates, vocabulary, self._encode_text)

    def _encode_text(self, names: list[str]) -> torch.Tensor:
        # One concept per call: like the image side, the text tower's GEMMs pick kernels by batch size, and a
        # concept's embedding must not depend on which other concepts happened to miss the cache with it.
        templates = self.metadata.prompt_templates
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype,
                                                    enabled=self.dtype != torch.float32):
            return torch.cat([self.text_encoder.encode([name], templates).float() for name in names])

    def postprocess(self, output: ZUTISOutput, index: int, prepared: PreparedImage, vocabulary: list[str],
                    text_embeddings: torch.Tensor, params: InferenceParams, semantic: bool = True) -> Prediction:
        """Image ``index`` of a forward pass -> ``Prediction`` at its original size."""
        with torch.inference_mode():
            return postprocess(output.mask_probs[index], output.semantic_features[index],
                               text_embeddings.to(output.semantic_features.device), vocabulary,
                               prepared.letterbox, params, semantic=semantic)

    # -- all in one ------------------------------------------------------------------------------------------
    def predict(self, images: Sequence[Any], concepts: Sequence[str], cache: TextEmbeddingCache | None = None,
                semantic: bool = True, batch_size: int = 8, **overrides: Any) -> list[Prediction]:
        """Segment ``images`` with the vocabulary ``concepts``; one ``Prediction`` per image, in order."""
        if isinstance(images, (np.ndarray, torch.Tensor)) and getattr(images, "ndim", 0) == 3:
            images = [images]
        params = self.params(**overrides)
        vocabulary, text = self.encode_concepts(concepts, cache)
        results: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            prepared = [self.prepare(im) for im in images[start:start + batch_size]]
            out = self.forward(prepared)
            results.extend(self.postprocess(out, i, p, vocabulary, text, params, semantic)
                           for i, p in enumerate(prepared))
        return results
