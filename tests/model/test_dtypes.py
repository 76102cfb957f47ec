from pathlib import Path

import numpy as np
import pytest
import torch

from model.dtypes import BF16_FEATURES, native_bf16_feature
from model.predictor import Predictor


def test_native_bf16_feature_agrees_with_cpuinfo():
    """torch's CPU probe and the kernel's flags name the same native bfloat16 feature."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = next(line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("flags"))
    assert native_bf16_feature() == next((f for f in BF16_FEATURES if f in flags), None)


def test_bfloat16_on_cpu_keeps_weights_in_bfloat16_and_norms_in_float32(tiny_checkpoint):
    """No cast per call: the image network's matrices are bfloat16 once loaded; layer norms and the text tower
    stay float32, and the outputs are float32 close to the float32 network's."""
    bf16 = Predictor.from_checkpoint(tiny_checkpoint, "cpu", "bfloat16")
    f32 = Predictor.from_checkpoint(tiny_checkpoint, "cpu", "float32")
    linears = [m for m in bf16.model.modules() if isinstance(m, torch.nn.Linear)]
    norms = [m for m in bf16.model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    assert all(p.dtype == torch.float32 for p in bf16.text_encoder.parameters())
    assert torch.equal(bf16.encode_concepts(["cat"])[1], f32.encode_concepts(["cat"])[1])
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    for geometry in ("letterbox", "native"):
        a = Predictor.from_checkpoint(tiny_checkpoint, "cpu", "bfloat16", geometry=geometry)
        b = Predictor.from_checkpoint(tiny_checkpoint, "cpu", "float32", geometry=geometry)
        out_a, out_b = a.forward([a.prepare(image)]), b.forward([b.prepare(image)])
        assert out_a.mask_probs.dtype == out_a.semantic_features.dtype == torch.float32
        assert 0 < (out_a.mask_probs - out_b.mask_probs).abs().max() < 0.02  # really bfloat16, and close
        assert (out_a.semantic_features - out_b.semantic_features).abs().max() < 0.03
