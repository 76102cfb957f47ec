"""The user-facing inference object: a loaded checkpoint on a device, answering ``predict(images, concepts)``.

Stateless and thread-safe: nothing about a call is stored on the object, and text embeddings go through an
explicit ``TextEmbeddingCache`` that the caller owns. The steps are public so that the service can batch them:
``prepare`` (per image, CPU) -> ``forward`` (one batched pass, the device) -> ``encode_concepts`` (raw names) or
``encode_vocabulary`` (a vocabulary already built; per request, cached) -> ``postprocess`` (per image).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from model.checkpoint import CheckpointMetadata, LoadedCheckpoint, load_checkpoint
from model.config import InferenceParams
from model.dtypes import canonical_dtype
from model.embedding_cache import TextEmbeddingCache
from model.geometry import Placement, check_geometry, preprocess_image
from model.native import NativeSize, padded_fraction, preprocess_native
from model.network import ZUTISOutput
from model.postprocess import Prediction, postprocess
from model.text import build_vocabulary

@dataclass(frozen=True)
class PreparedImage:
    """One image ready for the network: ``tensor`` float32 on the CPU, (3, S, S) letterboxed or (3, rh, rw) at
    its native size, and ``placement``, where the image sits in it (``Letterbox`` or ``NativeSize``)."""

    tensor: torch.Tensor
    placement: Placement

    @property
    def letterbox(self) -> Placement:
        """The placement (its name from before native geometry existed)."""
        return self.placement

    @property
    def is_native(self) -> bool:
        return isinstance(self.placement, NativeSize)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when a GPU is visible, else ``cpu``; otherwise ``torch.device(device)`` checked."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """Compute precision: a ``torch.dtype`` or a name of ``model.dtypes.DTYPE_NAMES``; ``"auto"`` is float32 on CPU
    and float16 (autocast) on CUDA. ``ValueError`` for an unknown name, or reduced precision on CPU."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif (name := canonical_dtype(dtype)) == "auto":
        resolved = torch.float16 if device.type == "cuda" else torch.float32
    else:
        resolved = getattr(torch, name)
    if device.type == "cpu" and resolved != torch.float32:
        raise ValueError("only float32 is supported on CPU (reduced precision gave no speed-up there)")
    return resolved


class Predictor:
    """A checkpoint loaded on a device.

    ``predict(images, concepts, cache=None, semantic=True, **overrides) -> list[Prediction]``: images are PIL
    images or (H, W, 3) uint8 RGB arrays of any sizes; ``overrides`` are ``InferenceParams`` fields.
    """

    def __init__(self, loaded: LoadedCheckpoint, device: torch.device, dtype: torch.dtype,
                 input_size: int | None = None, geometry: str | None = None) -> None:
        # The fused MultiheadAttention fast path picks batch-size-dependent kernels; without it an image's
        # outputs are bitwise independent of its batch (tests/model/test_network.py). Process-wide setting.
        torch.backends.mha.set_fastpath_enabled(False)
        self._loaded = loaded
        self.device = device
        self.dtype = dtype
        # letterbox: the square input side S; native: the longer-side cap.
        self.input_size = int(input_size or loaded.metadata.inference_input_size)
        self.geometry = check_geometry(geometry or loaded.metadata.inference_geometry)
        self.patch_size = loaded.metadata.model_config.patch_size
        if self.input_size < self.patch_size:
            raise ValueError(f"input size {self.input_size} is smaller than one patch")
        self.model = loaded.model.to(device).eval()
        self.text_encoder = loaded.text_encoder.to(device).eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                        input_size: int | None = None, geometry: str | None = None) -> "Predictor":
        """Load ``path``; ``input_size`` and ``geometry`` (``letterbox``/``native``) default to the checkpoint's."""
        dev = resolve_device(device)
        if geometry is not None:
            check_geometry(geometry)
        return cls(load_checkpoint(path, "cpu"), dev, resolve_dtype(dtype, dev), input_size, geometry)

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
        """One image (PIL or (H, W, 3) uint8) as a normalised CPU tensor: letterboxed to (3, S, S), or in native
        geometry (3, rh, rw), resized only if its longer side exceeds ``input_size`` (``ValueError`` when a side
        is then shorter than one patch)."""
        cfg = self.metadata.model_config
        if self.geometry == "native":
            tensor, size = preprocess_native(image, self.input_size, cfg.image_mean, cfg.image_std,
                                             min_side=self.patch_size)
            return PreparedImage(tensor, size)
        tensor, letterbox = preprocess_image(image, self.input_size, cfg.image_mean, cfg.image_std)
        return PreparedImage(tensor, letterbox)

    def sequence_length(self, prepared: PreparedImage) -> int:
        """Encoder tokens of one prepared image (CLS included): what its forward pass costs."""
        h, w = prepared.tensor.shape[-2:]
        return (h // self.patch_size) * (w // self.patch_size) + 1

    def padded_fraction(self, batch: Sequence[PreparedImage]) -> float:
        """The fraction of a batch's network input that is padding, not image: in native geometry the padded
        token slots of the ragged batch (``1 - sum(n_i) / (B * max(n_i))``), in letterbox geometry the padded
        pixels of the ``S x S`` squares."""
        if not batch:
            return 0.0
        if all(p.is_native for p in batch):
            return padded_fraction([self.sequence_length(p) for p in batch])
        valid = sum(p.placement.valid_hw[0] * p.placement.valid_hw[1] for p in batch)
        return 1.0 - valid / sum(p.tensor.shape[-2] * p.tensor.shape[-1] for p in batch)

    def forward(self, batch: Sequence[PreparedImage]) -> ZUTISOutput:
        """One batched forward pass; outputs are float32 on ``self.device``, image ``i`` at index ``i``.

        Native images of different sizes share the pass (``ZUTIS.forward_ragged``; ``grid_hw`` is then set);
        a batch must not mix geometries.
        """
        if not batch:
            raise ValueError("forward needs at least one image")
        native = [p.is_native for p in batch]
        if any(native) and not all(native):
            raise ValueError("a batch cannot mix letterboxed and native-size images")
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype,
                                                    enabled=self.dtype != torch.float32):
            if all(native):
                out = self.model.forward_ragged([p.tensor.to(self.device, non_blocking=True) for p in batch])
            else:
                x = torch.stack([p.tensor for p in batch]).to(self.device, non_blocking=True)
                out = self.model(x, torch.tensor([p.placement.valid_hw for p in batch]))
        return ZUTISOutput(out.mask_probs.float(), out.semantic_features.float(), grid_hw=out.grid_hw)

    def encode_concepts(self, concepts: Sequence[str],
                        cache: TextEmbeddingCache | None = None) -> tuple[list[str], torch.Tensor]:
        """Raw concept names -> their vocabulary (``text.build_vocabulary``: background first, normalised,
        deduplicated) and its ``(C, E)`` unit-norm embeddings."""
        vocabulary = build_vocabulary(concepts)
        return vocabulary, self.encode_vocabulary(vocabulary, cache)

    def encode_vocabulary(self, vocabulary: Sequence[str], cache: TextEmbeddingCache | None = None) -> torch.Tensor:
        """``(C, E)`` unit-norm embeddings of a vocabulary already built (background first, normalised names,
        used as they are), through ``cache`` when given."""
        if cache is None:
            return self._encode_text(list(vocabulary))
        return cache.get_many(self.model_id, self.metadata.prompt_templates, vocabulary, self._encode_text)

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
        probs, features = output.mask_probs[index], output.semantic_features[index]
        if output.grid_hw is not None:  # a ragged batch: this image's own grid
            gh, gw = output.grid_hw[index]
            probs, features = probs[:, :gh, :gw].contiguous(), features[:gh, :gw].contiguous()
        with torch.inference_mode():
            return postprocess(probs, features, text_embeddings.to(features.device), vocabulary,
                               prepared.placement, params, semantic=semantic)

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
