"""GPU-only checks (skipped without CUDA): the native path on the device agrees with the CPU in float32 and with
itself in half precision, batched and alone, and the GPU benchmark runs. CPU runs cannot check any of this."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.config import tiny_test_config
from model.network import ZUTIS
from model.predictor import Predictor
from tests.model.conftest import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SIZES = [(60, 80), (80, 60), (41, 63), (64, 64), (17, 120)]


@pytest.fixture
def no_tf32():
    """TF32 rounds float32 GEMMs and convolutions to 10-bit mantissas: off, for a float32 comparison."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_cuda_ragged_forward_matches_cpu_in_float32(no_tf32):
    torch.manual_seed(0)
    net = ZUTIS(tiny_test_config()).eval()
    images = [torch.randn(3, h, w) for h, w in SIZES]
    with torch.no_grad():
        cpu = net.forward_ragged(images)
        gpu = net.cuda().forward_ragged([im.cuda() for im in images])
    assert gpu.grid_hw == cpu.grid_hw
    assert (gpu.mask_probs.cpu() - cpu.mask_probs).abs().max() < 1e-3
    assert (gpu.semantic_features.cpu() - cpu.semantic_features).abs().max() < 1e-3


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_half_precision_batched_close_to_alone_and_to_float32(tmp_path, dtype):
    path = make_tiny_checkpoint(tmp_path / "tiny.safetensors", geometry="native")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]
    half = Predictor.from_checkpoint(path, "cuda", dtype)
    full = Predictor.from_checkpoint(path, "cuda", "float32")
    batched = half.predict(images, ["cat", "dog"], batch_size=len(images))
    for image, together in zip(images, batched):
        alone = half.predict([image], ["cat", "dog"])[0]
        reference = full.predict([image], ["cat", "dog"])[0]
        # cuBLAS picks kernels per shape: not bitwise, but the same maps up to rounding
        assert (together.semantic == alone.semantic).mean() > 0.99
        assert (together.semantic == reference.semantic).mean() > 0.9  # a random model: many near-ties


def test_gpu_bench_quick_run(tmp_path):
    from benchmarks.gpu_bench import main

    out = tmp_path / "gpu.json"
    assert main(["--dry-run", "--device", "cuda", "--service-batch-sizes", "", "--json-out", str(out),
                 "--work-dir", str(tmp_path)]) == 0
    rows = json.loads(out.read_text())["in_process"]
    assert {r["dtype"] for r in rows} == {"float16", "bfloat16"}
    assert all(r["forward"]["images_per_s"] > 0 for r in rows)
