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


@pytest.fixture(autouse=True, scope="session")
def _zutis_cache_in_tmp(tmp_path_factory):
    """What defaults to ~/.cache/zutis (the OpenVINO exports of ``--runtime auto`` commands) goes to a temporary
    folder instead: the tests leave nothing in the user's home."""
    patch = pytest.MonkeyPatch()
    patch.setenv("ZUTIS_CACHE_DIR", str(tmp_path_factory.mktemp("zutis-cache")))
    yield
    patch.undo()
