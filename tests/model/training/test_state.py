"""Training state: every RNG and the optimiser round-trip exactly; files are written atomically, weights-only."""

from __future__ import annotations

import random

import numpy as np
import torch

from model.training.state import capture_rng_state, load_training_state, restore_rng_state, save_training_state


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_rng_state_round_trips_python_numpy_and_torch():
    state = capture_rng_state()
    first = _draws()
    restore_rng_state(state)
    assert _draws() == first


def test_save_and_load_restore_model_optimizer_step_and_rng(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = tmp_path / "state.pt"
    save_training_state(path, model, opt, 7, extra={"config": {"a": [1, 2]}})
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary file left behind
    expected_next = _draws()

    other = torch.nn.Linear(3, 2)
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.1)
    _draws()
    step, extra = load_training_state(path, other, other_opt)
    assert step == 7 and extra == {"config": {"a": [1, 2]}}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])
    assert _draws() == expected_next
    torch.load(str(path), weights_only=True)  # nothing that needs unpickling
