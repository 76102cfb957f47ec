"""benchmarks/fixtures.py, the one helper module of the benchmarks (and of the tests that start the service)."""

from __future__ import annotations

import io
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.fixtures import (COCO_SIZES, blob_jpeg, blob_masks, coco_like_jpegs, free_port, random_checkpoint,
                                 service_env)
from model.checkpoint import load_checkpoint
from model.config import tiny_test_config


def test_random_checkpoint_is_a_real_checkpoint_determined_by_its_seed(tmp_path):
    a = random_checkpoint(tmp_path / "sub" / "a.safetensors", made_by="test")
    b = random_checkpoint(tmp_path / "b.safetensors", tiny_test_config(), vocabulary=["background", "x"])
    c = random_checkpoint(tmp_path / "c.safetensors", seed=1)
    la, lb, lc = (load_checkpoint(p, "cpu") for p in (a, b, c))
    assert la.metadata.model_config == tiny_test_config() and la.metadata.vocabulary == ["background", "cat", "dog"]
    assert lb.metadata.vocabulary == ["background", "x"] and la.metadata.provenance["made_by"] == "test"
    wa, wb, wc = (dict(x.model.named_parameters()) for x in (la, lb, lc))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_blob_jpegs_decode_at_their_size_and_follow_their_seed():
    plain = blob_jpeg(48, 80, seed=3)
    image = Image.open(io.BytesIO(plain))
    assert image.format == "JPEG" and image.size == (80, 48)
    assert blob_jpeg(48, 80, seed=3) == plain != blob_jpeg(48, 80, seed=4)
    noisy = np.asarray(Image.open(io.BytesIO(blob_jpeg(48, 80, seed=3, noise=6.0))), dtype=float)
    assert 1.0 < np.abs(noisy - np.asarray(image, dtype=float)).mean() < 15.0
    sizes = [Image.open(io.BytesIO(j)).size[::-1] for j in coco_like_jpegs(len(COCO_SIZES) + 1)]
    assert sizes == COCO_SIZES + COCO_SIZES[:1]


def test_blob_masks_are_distinct_irregular_blobs():
    masks = blob_masks((60, 80), 4, seed=0)
    assert masks.shape == (4, 60, 80) and masks.dtype == bool
    assert all(0 < m.sum() < 60 * 80 for m in masks) and not np.array_equal(masks[0], masks[1])
    assert np.array_equal(masks, blob_masks((60, 80), 4, seed=0))


def test_service_env_drops_the_callers_settings_and_sets_the_given(monkeypatch):
    monkeypatch.setenv("ZUTIS_DEVICE", "cuda")
    monkeypatch.setenv("ZUTIS_MAX_QUEUE", "9")
    monkeypatch.setenv("UNRELATED", "kept")
    env = service_env("w.safetensors", 1234, max_batch_size=4, torch_threads=None)
    assert env["ZUTIS_CHECKPOINT"] == "w.safetensors" and env["ZUTIS_PORT"] == "1234"
    assert env["ZUTIS_HOST"] == "127.0.0.1" and env["ZUTIS_MAX_BATCH_SIZE"] == "4" and env["UNRELATED"] == "kept"
    assert "ZUTIS_DEVICE" not in env and "ZUTIS_MAX_QUEUE" not in env and "ZUTIS_TORCH_THREADS" not in env


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
