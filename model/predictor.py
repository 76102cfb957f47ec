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
from model.dtypes import canonical_dtype, native_bf16_feature
from model.embedding_cache import TextEmbeddingCache
from model.geometry import Placement, check_geometry, preprocess_image
from model.native import NativeSize, padded_fraction, preprocess_native
from model.network import ZUTISOutput, valid_grid_size
from model.cache_dir import default_cache_dir
from model.runtime import resolve_runtime
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


def resolve_precision(dtype: str | torch.dtype, device: torch.device,
                      bf16_feature: str | None | bool = True) -> tuple[torch.dtype, str]:
    """Compute precision for a device, and why: ``(dtype, reason)``.

    ``dtype``: a ``torch.dtype`` or a name of ``model.dtypes.DTYPE_NAMES``. ``"auto"`` is float16 (autocast) on
    CUDA; on a CPU bfloat16 where the CPU computes it natively (``bf16_feature``: the feature found, default
    ``model.dtypes.native_bf16_feature()``; tests pass None or a name), else float32. ``ValueError`` for an
    unknown name, or float16 on CPU (no CPU kernels for it worth having).
    """
    if bf16_feature is True:
        bf16_feature = native_bf16_feature() if device.type == "cpu" else None
    if isinstance(dtype, torch.dtype):
        resolved, reason = dtype, f"{str(dtype).removeprefix('torch.')} asked for"
    elif (name := canonical_dtype(dtype)) != "auto":
        resolved, reason = getattr(torch, name), f"{name} asked for"
    elif device.type == "cuda":
        resolved, reason = torch.float16, "auto on CUDA: float16 autocast"
    elif bf16_feature:
        resolved, reason = torch.bfloat16, f"auto on a CPU with native bfloat16 ({bf16_feature})"
    else:
        resolved, reason = torch.float32, "auto on a CPU without native bfloat16 (no AMX or AVX-512 BF16)"
    if device.type == "cpu" and resolved not in (torch.float32, torch.bfloat16):
        raise ValueError("on CPU the precision is float32 or bfloat16 (float16 has no fast CPU kernels)")
    return resolved, reason


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of ``resolve_precision`` (without the reason)."""
    return resolve_precision(dtype, device)[0]


def _keep_norms_float32(model: torch.nn.Module) -> torch.nn.Module:
    """Layer norms' parameters back to float32 in a reduced-precision module: torch's CPU layer norm takes a
    bfloat16 input with float32 weights and computes its statistics in float32 either way."""
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.float()
    return model


class Predictor:
    """A checkpoint loaded on a device.

    ``predict(images, concepts, cache=None, semantic=True, **overrides) -> list[Prediction]``: images are PIL
    images or (H, W, 3) uint8 RGB arrays of any sizes; ``overrides`` are ``InferenceParams`` fields.
    """

    def __init__(self, loaded: LoadedCheckpoint, device: torch.device, dtype: torch.dtype,
                 input_size: int | None = None, geometry: str | None = None, runtime: str = "torch",
                 cache_dir: str | Path | None = None, dtype_reason: str | None = None) -> None:
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
        self.dtype_reason = dtype_reason or f"{str(dtype).removeprefix('torch.')} asked for"
        self.runtime, self.runtime_reason = resolve_runtime(runtime, device.type)
        self._openvino = None
        # Reduced precision on a CPU: the image network's weights are cast once, here (autocast would cast them
        # on every call: a quarter of a bfloat16 forward). Layer norms keep float32 weights; the text tower stays
        # float32 (its embeddings are cached, so its cost is paid once per concept).
        self._weights_in_dtype = device.type == "cpu" and dtype != torch.float32
        if self.runtime == "openvino":
            from model.openvino_runtime import OpenVinoNetwork, exported_ir  # deferred: imports openvino

            ir = exported_ir(self.model, self.sha256, Path(cache_dir) if cache_dir else default_cache_dir())
            self._openvino = OpenVinoNetwork(self.model, ir, dtype, threads=torch.get_num_threads())
        elif self._weights_in_dtype:
            self.model = _keep_norms_float32(self.model.to(dtype))

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                        input_size: int | None = None, geometry: str | None = None, runtime: str = "torch",
                        cache_dir: str | Path | None = None) -> "Predictor":
        """Load ``path``; ``input_size`` and ``geometry`` (``letterbox``/``native``) default to the checkpoint's.

        ``dtype``: ``resolve_precision`` (``auto``: bfloat16 on a CPU with native bfloat16, float32 on other CPUs,
        float16 on CUDA; ``float32`` reproduces the official code exactly). ``runtime``: ``torch``, ``openvino``
        or ``auto`` (``model.runtime``; the service and the commands default to ``auto``). ``cache_dir``: where
        the OpenVINO runtime keeps exported networks (default ``model.cache_dir.default_cache_dir()``).
        """
        dev = resolve_device(device)
        if geometry is not None:
            check_geometry(geometry)
        resolved, reason = resolve_precision(dtype, dev)
        return cls(load_checkpoint(path, "cpu"), dev, resolved, input_size, geometry, runtime, cache_dir, reason)

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
        if self._openvino is not None:
            return self._forward_openvino(batch)
        dtype = self.dtype if self._weights_in_dtype else torch.float32
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype, enabled=self._autocast):
            if all(native):
                out = self.model.forward_ragged([p.tensor.to(self.device, dtype, non_blocking=True) for p in batch])
            else:
                x = torch.stack([p.tensor for p in batch]).to(self.device, dtype, non_blocking=True)
                out = self.model(x, torch.tensor([p.placement.valid_hw for p in batch]))
        return ZUTISOutput(out.mask_probs.float(), out.semantic_features.float(), grid_hw=out.grid_hw)

    @property
    def _autocast(self) -> bool:
        """Reduced precision by autocast: on CUDA only (on a CPU the weights are in the compute precision)."""
        return self.device.type == "cuda" and self.dtype != torch.float32

    def _forward_openvino(self, batch: Sequence[PreparedImage]) -> ZUTISOutput:
        """``forward`` on the OpenVINO runtime: one inference per image, the outputs assembled as torch's."""
        from model.image_network import finish_outputs

        assert self._openvino is not None
        outputs = [self._openvino.run(p.tensor) for p in batch]
        probs, projections = [o[0] for o in outputs], [o[1] for o in outputs]
        valid = None
        if not batch[0].is_native:  # letterbox: the text-space statistics come from the valid region only
            hp, wp = probs[0].shape[-2:]
            rows, cols = valid_grid_size(torch.tensor([p.placement.valid_hw for p in batch]),
                                         batch[0].tensor.shape[-2:], hp, wp, len(batch))
            valid = list(zip(rows, cols))
        mask_probs, semantic, grid_hw = finish_outputs(probs, projections, valid)
        if batch[0].is_native and grid_hw is None:
            grid_hw = [tuple(mask_probs.shape[-2:])] * len(batch)
        return ZUTISOutput(mask_probs.to(self.device), semantic.to(self.device), grid_hw=grid_hw)

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
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype, enabled=self._autocast):
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
