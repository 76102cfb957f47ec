"""The optimiser and its schedule: AdamW in two parameter groups, the release's PolyLR, weighted loss sum."""

from __future__ import annotations

import torch

from model.training.config import OptimConfig


def poly_lr(base_lr: float, step: int, total_steps: int, power: float = 0.9, min_lr: float = 1e-6) -> float:
    """PolyLR of the release: ``max(base * (1 - step / total) ** power, min_lr)``; step 0 uses ``base``."""
    return max(base_lr * (1.0 - step / total_steps) ** power, min_lr)


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW with two groups: the CLIP encoder at ``lr * encoder_lr_mult``, everything else at ``lr``; weight
    decay on every parameter (LayerNorms, biases and queries included, as the release)."""
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    encoder_ids = {id(p) for p in encoder}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids]
    groups = [{"params": encoder, "base_lr": optim.lr * optim.encoder_lr_mult, "name": "encoder"},
              {"params": rest, "base_lr": optim.lr, "name": "heads"}]
    for g in groups:
        g["lr"] = g["base_lr"]
    return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, step: int, optim: OptimConfig) -> list[float]:
    lrs = []
    for g in optimizer.param_groups:
        g["lr"] = poly_lr(g["base_lr"], step, optim.steps, optim.poly_power, optim.min_lr)
        lrs.append(g["lr"])
    return lrs


def total_loss(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """The one place loss weights are applied (a loss missing from ``weights`` has weight 1)."""
    return sum(weights.get(name, 1.0) * value for name, value in losses.items())


__all__ = ["poly_lr", "build_optimizer", "set_lr", "total_loss"]
