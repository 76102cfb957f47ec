"""The image network on OpenVINO (CPU): exported once per checkpoint, compiled once per input size and precision.

- Export: ``model.export.export_openvino`` writes the IR (float32 weights) to
  ``<cache_dir>/openvino/<checkpoint sha256[:16]>/`` the first time a checkpoint is served; later starts read it.
- Compile: OpenVINO's CPU plugin runs bfloat16 only on static shapes (its dynamic-shape attention kernels refuse
  bf16, and dynamic float32 was no faster), so the IR is reshaped to each input size it meets and compiled for
  it, with ``INFERENCE_PRECISION_HINT`` ``f32`` or ``bf16``. OpenVINO's own model cache
  (``<...>/compiled/``) keeps every compiled blob on disk, so a restart compiles nothing it compiled before; in
  memory at most ``max_compiled`` sizes are held (least recently used dropped). A letterbox service meets one
  size; native geometry one per distinct patch grid (COCO: a handful).
- Run: one image per inference; ``model.image_network.finish_outputs`` does the text-space normalisation
  in float32 in torch.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.export import OPENVINO_NAME, export_openvino
from model.image_network import network_inputs, patch_grid
from model.network import ZUTIS

log = logging.getLogger("model.openvino_runtime")

PRECISION_HINTS = {torch.float32: "f32", torch.bfloat16: "bf16"}


def exported_ir(model: ZUTIS, sha256: str, cache_dir: Path) -> Path:
    """The OpenVINO IR of a checkpoint (its ``sha256``) under ``cache_dir``, exported now if not there yet.

    The export is written to a temporary folder and renamed into place, so a crash or a concurrent start never
    leaves a half-written network that a later start would read.
    """
    folder = cache_dir / "openvino" / sha256[:16]
    path = folder / OPENVINO_NAME
    if path.is_file() and path.with_suffix(".bin").is_file():
        return path
    start = time.perf_counter()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{sha256[:16]}-", dir=folder.parent))
    except OSError as exc:  # a read-only cache (e.g. a volume mounted read-only): serve, but say what it costs
        private = Path(tempfile.mkdtemp(prefix=f"zutis-openvino-{sha256[:16]}-"))
        log.warning("cannot write the OpenVINO export under %s (%s): exporting to %s for this process only; set "
                    "ZUTIS_CACHE_DIR to a writable folder so that restarts reuse it", cache_dir, exc, private)
        export_openvino(model, private)
        return private / OPENVINO_NAME
    try:
        export_openvino(model, tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process exported it meanwhile
            if not path.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported the image network to %s in %.1f s", folder, time.perf_counter() - start)
    return path


@dataclass(frozen=True)
class _Compiled:
    """The image network compiled for one input size: its infer request (used under ``lock``), the inputs that
    depend only on the size, and the ``(h', w')`` grid of its outputs."""

    request: Any
    lock: threading.Lock
    size_inputs: dict[str, np.ndarray]
    grid_hw: tuple[int, int]


class OpenVinoNetwork:
    """The image network of ``model`` compiled by OpenVINO for this CPU in ``dtype`` (float32 or bfloat16).

    ``run(image)`` -> ``(mask_probs (Q, h', w'), text_proj (h', w', E))`` float32 torch tensors for one
    (3, H, W) normalised float32 image. Thread-safe (one compile at a time; each size has its own request,
    used under a lock).
    """

    def __init__(self, model: ZUTIS, ir_path: Path, dtype: torch.dtype, threads: int | None = None,
                 max_compiled: int = 8) -> None:
        import openvino as ov

        if dtype not in PRECISION_HINTS:
            raise ValueError(f"the OpenVINO runtime computes in float32 or bfloat16, not {dtype}")
        self.model = model
        self.dtype = dtype
        self.ir_path = ir_path
        self.max_compiled = max_compiled
        self._core = ov.Core()
        if os.access(ir_path.parent, os.W_OK):  # OpenVINO's compiled-model cache; skipped on a read-only cache
            self._core.set_property({"CACHE_DIR": str(ir_path.parent / "compiled")})
        self._ir = self._core.read_model(ir_path)
        # Not pinned to cores: the service's own threads (decoding, post-processing) share them, and so may other
        # processes; unpinned was as fast as pinned in an interleaved test here (medians 2.36 vs 2.67 s, noisy).
        self._config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[dtype],
                                        "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                                        "ENABLE_CPU_PINNING": False}
        if threads is not None:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        self._compiled: OrderedDict[tuple[int, int], _Compiled] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def compiled_sizes(self) -> list[tuple[int, int]]:
        """The (H, W) input sizes compiled and held in memory, least recently used first."""
        with self._lock:
            return list(self._compiled)

    def _request(self, height: int, width: int) -> _Compiled:
        key = (height, width)
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
            start = time.perf_counter()
            ir = self._ir.clone()
            h, w = patch_grid(self.model, height, width)
            d = self.model.config.vision_width
            ir.reshape({"image": [1, 3, height, width], "pos_embed": [1 + h * w, d],
                        "mask_pos": [4 * h * w, 1, d]})
            compiled = self._core.compile_model(ir, "CPU", self._config)
            # The inputs that depend only on the size (the interpolated position table, the decoder's sine
            # encoding: 27-72 ms to build) are built once per size, with the compiled network.
            pos_embed, mask_pos = network_inputs(self.model, height, width)
            entry = _Compiled(compiled.create_infer_request(), threading.Lock(),
                              {"pos_embed": pos_embed.numpy(), "mask_pos": mask_pos.numpy()}, (2 * h, 2 * w))
            self._compiled[key] = entry
            while len(self._compiled) > self.max_compiled:
                self._compiled.popitem(last=False)
            log.info("OpenVINO: compiled the image network for %d x %d (%s) in %.1f s", height, width,
                     PRECISION_HINTS[self.dtype], time.perf_counter() - start)
            return entry

    def run(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One (3, H, W) normalised image -> ``(mask_probs (Q, h', w'), text_proj (h', w', E))`` float32."""
        height, width = image.shape[-2:]
        if self.model.config.conv_stem is None:  # trailing pixels that fill no patch are dropped anyway
            p = self.model.config.patch_size
            height, width = height // p * p, width // p * p
            image = image[:, :height, :width]
        entry = self._request(height, width)
        with entry.lock:
            entry.request.infer({"image": image.unsqueeze(0).contiguous().numpy(), **entry.size_inputs})
            probs = torch.from_numpy(entry.request.get_tensor("mask_probs").data.copy())
            proj = torch.from_numpy(entry.request.get_tensor("text_proj").data.copy())
        hp, wp = entry.grid_hw
        return probs.reshape(-1, hp, wp).float(), proj.reshape(hp, wp, -1).float()


__all__ = ["OpenVinoNetwork", "PRECISION_HINTS", "exported_ir"]
