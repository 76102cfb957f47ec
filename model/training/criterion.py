"""Named, unweighted training losses of ZUTIS (reference §4.2, §7.2); the weights live in ``model.train``.

- ``mask``: class-agnostic. Per image, every decoder layer's proposals are Hungarian-matched to the instances
  (``model.training.hungarian``); the layer's loss is the *sum* over matched pairs of ``dice + bce`` at the crop
  resolution; layers are summed and images averaged over the whole batch (an image without instance pixels counts 0).
  There is no no-object term: unmatched queries get no gradient.
- ``ce``: cross-entropy of the raw cosine logits (no logit scale, the release) between the semantic features,
  upsampled bilinearly to the crop size, and the text embeddings, against the semantic target with
  ``ignore_index``. ``logit_scale`` multiplies the logits first; the release's value is 1 (the default). A larger
  one is a training-only choice (inference takes argmaxes and the §3.3 sigmoid of the cosine, unchanged); it
  sharpens the softmax when concept embeddings are close (docs/benchmarks.md).

Both run in float32 with autocast off (``binary_cross_entropy`` is unsafe under autocast; the CE logits are tiny).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.training.hungarian import match_layers, resize_mask_probs


def pair_mask_loss(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``dice + bce`` of matched pairs: probs (K, H, W) in [0, 1], targets (K, H, W) 0/1 -> (K,) float32."""
    p, g = probs.float().flatten(1), targets.float().flatten(1)
    dice = 1.0 - (2.0 * (p * g).sum(-1) + 1.0) / (p.sum(-1) + g.sum(-1) + 1.0)
    bce = F.binary_cross_entropy(p, g, reduction="none").mean(-1)
    return dice + bce


def mask_loss(layer_mask_probs: torch.Tensor, instance_masks: list[torch.Tensor]) -> torch.Tensor:
    """The ``mask`` loss.

    ``layer_mask_probs``: (B, L, Q, h', w') probabilities of every decoder layer; ``instance_masks``: B tensors
    (K_b, H, W) bool, the crop's instances (all-zero ones included: they are matched like any other).
    Returns a scalar: ``(1/B) * sum_b sum_l sum_{matched k} cost[k, q(k)]``.
    """
    b = layer_mask_probs.shape[0]
    if len(instance_masks) != b:
        raise ValueError(f"{len(instance_masks)} instance stacks for a batch of {b}")
    with torch.autocast(device_type=layer_mask_probs.device.type, enabled=False):
        # zero that keeps every mask-branch parameter in the graph: DDP expects a gradient for each of them even
        # when no image of the batch has instance pixels
        total = layer_mask_probs.float().sum() * 0.0
        for probs, targets in zip(layer_mask_probs, instance_masks):
            if targets.shape[0] == 0 or not bool(targets.any()):
                continue  # the release skips images without instance pixels but still divides by B
            size_hw = tuple(targets.shape[-2:])
            for layer_probs, (inst_idx, query_idx) in zip(probs, match_layers(probs, targets)):
                dev = layer_probs.device
                matched = resize_mask_probs(layer_probs[query_idx.to(dev)].float(), size_hw)
                total = total + pair_mask_loss(matched, targets[inst_idx.to(dev)]).sum()
    return total / b


def semantic_logits(semantic_features: torch.Tensor, text_embeddings: torch.Tensor,
                    size_hw: tuple[int, int]) -> torch.Tensor:
    """Raw cosine logits at ``size_hw``: features (B, h', w', E) upsampled bilinearly, dotted with (C, E) text
    embeddings -> (B, C, H, W) float32. Upsampling and the dot product are both linear, so whichever of E and C
    is smaller is upsampled (the result is the same up to rounding)."""
    feats = semantic_features.float().permute(0, 3, 1, 2)  # (B, E, h', w')
    text = text_embeddings.float().to(feats.device)
    if text.shape[0] <= feats.shape[1]:
        logits = torch.einsum("behw,ce->bchw", feats, text)
        return F.interpolate(logits, size=size_hw, mode="bilinear", align_corners=False)
    up = F.interpolate(feats, size=size_hw, mode="bilinear", align_corners=False)
    return torch.einsum("behw,ce->bchw", up, text)


def ce_loss(semantic_features: torch.Tensor, text_embeddings: torch.Tensor, semantic_target: torch.Tensor,
            ignore_index: int, logit_scale: float = 1.0) -> torch.Tensor:
    """The ``ce`` loss: mean cross-entropy of ``logit_scale * cosine`` over non-ignored pixels (0 when every
    pixel is ignored).

    ``semantic_features``: (B, h', w', E) unit-norm; ``text_embeddings``: (C, E) unit-norm, background first;
    ``semantic_target``: (B, H, W) int64 in ``[0, C) U {ignore_index}``.
    """
    with torch.autocast(device_type=semantic_features.device.type, enabled=False):
        logits = semantic_logits(semantic_features, text_embeddings, tuple(semantic_target.shape[-2:]))
        if logit_scale != 1.0:
            logits = logits * logit_scale
        summed = F.cross_entropy(logits, semantic_target, ignore_index=ignore_index, reduction="sum")
        n_valid = (semantic_target != ignore_index).sum().clamp(min=1)
        return summed / n_valid


def compute_losses(layer_mask_probs: torch.Tensor, semantic_features: torch.Tensor,
                   text_embeddings: torch.Tensor, semantic_target: torch.Tensor,
                   instance_masks: list[torch.Tensor], ignore_index: int,
                   ce_logit_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """All losses, unweighted: ``{"mask": ..., "ce": ...}`` (scalars). Shapes as in ``mask_loss`` / ``ce_loss``."""
    return {"mask": mask_loss(layer_mask_probs, instance_masks),
            "ce": ce_loss(semantic_features, text_embeddings, semantic_target, ignore_index, ce_logit_scale)}


__all__ = ["pair_mask_loss", "mask_loss", "semantic_logits", "ce_loss", "compute_losses"]
