"""Test-wide settings: deterministic, quiet CPU torch."""

import os

os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "33554432")

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _torch_cpu_settings():
    torch.set_flush_denormal(True)
    # The fused MultiheadAttention fast path is batch-size dependent; the predictor disables it too.
    torch.backends.mha.set_fastpath_enabled(False)
    yield
