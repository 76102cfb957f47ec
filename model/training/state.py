"""Resumable training state: model, optimiser, step and every RNG, written atomically.

The file is a ``torch.save`` dict of tensors, numbers, strings, lists and dicts only, so it loads with
``torch.load(weights_only=True)`` (nothing unpickled). The learning-rate schedule and the data stream are pure
functions of the step (``model.training.optim.poly_lr``, ``model.training.copy_paste.StepBatchSampler``), so the
step *is* their state; the RNG states cover everything else that draws random numbers.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def capture_rng_state() -> dict[str, Any]:
    """The python, numpy (global) and torch (CPU and every CUDA device) RNG states, weights-only serialisable."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                        extra: dict[str, Any] | None = None) -> None:
    """Write the state after ``step`` completed optimiser steps to ``path`` (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": int(step), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "rng": capture_rng_state(), "extra": extra or {}}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def load_training_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        restore_rng: bool = True) -> tuple[int, dict[str, Any]]:
    """Load ``path`` into ``model`` and ``optimizer`` (strict), restore the RNGs; returns ``(step, extra)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training state not found: {path} (nothing to resume)")
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if restore_rng:
        restore_rng_state(state["rng"])
    return int(state["step"]), dict(state["extra"])


__all__ = ["capture_rng_state", "restore_rng_state", "save_training_state", "load_training_state"]
