"""What the benchmarks build and drive, in one place (the tests reuse it too): random checkpoints in the project's
format, synthetic images and masks, and the service as a real process on loopback.

Nothing heavy at import: torch, PIL and httpx are imported by the functions that need them.

- **Checkpoints**: ``random_checkpoint`` writes a randomly initialised ZUTIS checkpoint (``model.checkpoint``
  format) of any ``ModelConfig`` (default the tiny test model; ``vit_b16_config`` the release's architecture).
  Random weights give the real shapes and the real cost, never meaningful answers.
- **Images**: ``blob_jpeg`` is a JPEG of smooth random colour blobs (it compresses and decodes like a photo, unlike
  white noise), optionally with mild noise; ``coco_like_jpegs`` cycles through COCO's common sizes;
  ``blob_masks`` gives irregular instance masks; ``example_png`` resizes an example picture.
- **The service**: ``free_port``, ``service_env`` / ``start_service`` (``python -m service`` with ``ZUTIS_*``
  settings, the caller's own ``ZUTIS_*`` variables dropped), ``wait_ready``, ``rss_mb``, ``stop``.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
# (H, W) of COCO images, most common first (val2017: 640x480 and 480x640 are about half of all images).
COCO_SIZES = [(480, 640), (427, 640), (640, 480), (480, 640), (640, 427), (424, 640), (375, 500), (360, 640),
              (612, 612), (512, 640), (480, 640), (500, 375), (426, 640), (640, 428), (333, 500), (480, 640)]


# -- random checkpoints ------------------------------------------------------------------------------------------

def vit_b16_config(input_size: int = 384, arch: str = "ViT-B-16-quickgelu") -> Any:
    """The release's architecture (``model.config.ModelConfig`` of open_clip ``arch``) at ``input_size``."""
    from model.config import ModelConfig

    return ModelConfig(clip_model=arch, input_size=input_size)


def random_checkpoint(path: str | Path, config: Any = None, *, seed: int = 0, model_id: str | None = None,
                      vocabulary: Sequence[str] = ("background", "cat", "dog"), made_by: str = "benchmarks",
                      **metadata: Any) -> Path:
    """Write a randomly initialised ZUTIS checkpoint (weights from ``torch.manual_seed(seed)``) for ``config``
    (default ``model.config.tiny_test_config()``) to ``path`` (folders created) and return ``path``. Other
    ``CheckpointMetadata`` fields (``inference``, ``geometry``, ...) pass through ``metadata``."""
    import torch

    from model.checkpoint import CheckpointMetadata, save_checkpoint
    from model.config import tiny_test_config
    from model.network import ZUTIS
    from model.text import TextEncoder

    config = config if config is not None else tiny_test_config()
    torch.manual_seed(seed)
    model, text = ZUTIS(config), TextEncoder(config)
    metadata.setdefault("provenance", {"made_by": made_by, "weights": "random"})
    meta = CheckpointMetadata(model_id=model_id or f"random-{(config.clip_model or 'tiny').lower()}",
                              model_config=config, vocabulary=list(vocabulary), **metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model, text.tower, meta)
    return path


# -- synthetic images --------------------------------------------------------------------------------------------

def blob_jpeg(height: int, width: int, seed: int = 0, noise: float = 0.0, quality: int = 90) -> bytes:
    """A JPEG of smooth random colour blobs (bicubic upsampling of a 1/32-size random image) from
    ``numpy.random.default_rng(seed)``; ``noise`` > 0 adds Gaussian noise of that standard deviation (0-255)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    if noise > 0:
        pixels = np.asarray(image, dtype=np.int16)
        image = Image.fromarray(np.clip(pixels + rng.normal(0, noise, pixels.shape), 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def example_png(size: tuple[int, int]) -> bytes:
    """``examples/shapes-1.png`` resized to ``size`` (width, height), as PNG: a picture the demo checkpoint finds
    objects in, for benchmarks of the service itself."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(REPO_ROOT / "examples" / "shapes-1.png").convert("RGB").resize(size).save(buffer, format="PNG")
    return buffer.getvalue()


def coco_like_jpegs(count: int) -> list[bytes]:
    """``count`` blob JPEGs (seeds 0..count-1) at COCO's common sizes (``COCO_SIZES``, cycled)."""
    return [blob_jpeg(*COCO_SIZES[i % len(COCO_SIZES)], seed=i) for i in range(count)]


def blob_masks(hw: tuple[int, int], count: int, seed: int = 0) -> np.ndarray:
    """``(count, H, W)`` bool masks of irregular blobs (smooth noise thresholded inside ellipses)."""
    import torch
    import torch.nn.functional as F

    h, w = hw
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    noise = F.interpolate(torch.randn(count, 1, 12, 16, generator=gen), size=hw, mode="bilinear",
                          align_corners=False)[:, 0]
    masks = []
    for k in range(count):
        cy, cx = float(torch.rand(1, generator=gen)) * h, float(torch.rand(1, generator=gen)) * w
        ry, rx = 20 + 100 * float(torch.rand(1, generator=gen)), 20 + 140 * float(torch.rand(1, generator=gen))
        dist = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        masks.append((dist + 0.3 * noise[k] < 1.0).numpy())
    return np.stack(masks)


# -- the service as a process ------------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_env(checkpoint: str | Path, port: int, **settings: Any) -> dict[str, str]:
    """The environment of a ``python -m service`` process: this process's, without its ``ZUTIS_*`` variables
    (except ``ZUTIS_CACHE_DIR``: where OpenVINO exports and zoo models are kept), plus ``ZUTIS_CHECKPOINT``,
    ``ZUTIS_HOST=127.0.0.1``, ``ZUTIS_PORT`` and ``ZUTIS_<KEY>`` for each of ``settings`` (``max_batch_size=4`` ->
    ``ZUTIS_MAX_BATCH_SIZE=4``; None values are left out). ``MALLOC_MMAP_THRESHOLD_`` defaults to 32 MiB (the CPU
    allocator trap of docs/benchmarks.md)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZUTIS_") or k == "ZUTIS_CACHE_DIR"}
    env.update(ZUTIS_CHECKPOINT=str(checkpoint), ZUTIS_HOST="127.0.0.1", ZUTIS_PORT=str(port))
    env.update({f"ZUTIS_{key.upper()}": str(value) for key, value in settings.items() if value is not None})
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "33554432")
    return env


def start_service(checkpoint: str | Path, port: int, log_path: Path, extra_env: dict[str, str] | None = None,
                  **settings: Any) -> subprocess.Popen:
    """Start ``python -m service`` in the repository root with ``service_env(checkpoint, port, **settings)`` (and
    ``extra_env`` on top), its output to ``log_path``; returns at once (``wait_ready`` waits)."""
    env = {**service_env(checkpoint, port, **settings), **(extra_env or {})}
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "service"], stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=REPO_ROOT)


def wait_ready(url: str, process: subprocess.Popen | None, timeout_s: float, log_path: Path | None = None,
               poll_s: float = 0.5) -> None:
    """Return once ``url``'s ``/readyz`` answers 200; ``SystemExit`` (with the end of ``log_path``) if ``process``
    exits first, or after ``timeout_s``."""
    import httpx

    end = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process is not None and process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path is not None and log_path.exists() else ""
            raise SystemExit(f"the service exited with {process.returncode}" + (f":\n{tail}" if tail else ""))
        if time.monotonic() > end:
            raise SystemExit(f"the service was not ready within {timeout_s:.0f} s")
        time.sleep(poll_s)


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (Linux ``/proc``); NaN when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def stop(process: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM (the service drains), then SIGKILL if it has not exited within ``timeout_s``; reaps it."""
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


__all__ = ["REPO_ROOT", "COCO_SIZES", "vit_b16_config", "random_checkpoint", "blob_jpeg", "coco_like_jpegs",
           "blob_masks", "free_port", "service_env", "start_service", "wait_ready", "rss_mb", "stop"]
