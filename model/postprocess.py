"""From one image's network outputs and concept embeddings to a ``Prediction`` (reference §3.2-3.4, Algorithm 1).

Pure, batched tensor code on whatever device the inputs live on. Instance scores and categories come from the
low-resolution ``h' x w'`` proposals; only the candidates that survive (non-background, non-empty) are resampled
to the original ``(H, W)`` (exact: the others are discarded anyway, reference §7.4.4), then class-wise hard NMS,
then boxes. The masks stay boolean; ``model.answer`` encodes them (RLE or polygons).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from model.config import InferenceParams
from model.geometry import Placement
from model.resample import resample_argmax_to_image, resample_masks_to_image, valid_grid_hw
from model.mask_iou import mask_areas
from model.nms import mask_nms
from model.rle import as_numpy, encode_masks, masks_to_boxes_xywh


@dataclass(eq=False)
class InstancePrediction:
    """One instance: its concept (index into ``Prediction.concepts``, the vocabulary), score in [0, 1], COCO box
    ``[x, y, w, h]`` in pixels (inclusive extent), area in pixels and ``mask``, the ``(H, W)`` bool mask (a tensor
    on the device it was computed on, or a numpy array). ``model.answer`` encodes it for the JSON answer.
    """

    concept_index: int
    concept: str
    score: float
    bbox_xywh: tuple[float, float, float, float]
    area: int
    mask: Any  # (H, W) bool torch.Tensor or np.ndarray

    @cached_property
    def segmentation(self) -> dict[str, Any]:
        """The mask's COCO RLE, ``{"size": [H, W], "counts": str}`` (computed once, on first use)."""
        return encode_masks(self.mask[None])[0]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, InstancePrediction):
            return NotImplemented
        same = (self.concept_index, self.concept, self.score, self.bbox_xywh, self.area) == \
            (other.concept_index, other.concept, other.score, other.bbox_xywh, other.area)
        return same and np.array_equal(as_numpy(self.mask), as_numpy(other.mask))


@dataclass
class Prediction:
    """Everything predicted for one ``(H, W)`` image.

    ``concepts`` is the vocabulary, background first (named as the answer's JSON field); ``instances`` are by
    descending score; ``semantic`` is an ``(H, W)`` uint16 map of indices into ``concepts``, or None when not
    requested.
    """

    image_hw: tuple[int, int]
    concepts: list[str]
    instances: list[InstancePrediction]
    semantic: np.ndarray | None


def _check_outputs(mask_probs: torch.Tensor | None, semantic_features: torch.Tensor,
                   text_embeddings: torch.Tensor) -> None:
    if semantic_features.ndim != 3:
        raise ValueError(f"semantic_features must be (h', w', E), got shape {tuple(semantic_features.shape)}")
    if text_embeddings.ndim != 2 or text_embeddings.shape[0] < 1:
        raise ValueError(f"text_embeddings must be (C, E) with C >= 1, got shape {tuple(text_embeddings.shape)}")
    if text_embeddings.shape[1] != semantic_features.shape[2]:
        raise ValueError(f"embedding sizes differ: semantic_features E={semantic_features.shape[2]}, "
                         f"text_embeddings E={text_embeddings.shape[1]}")
    if mask_probs is not None:
        if mask_probs.ndim != 3:
            raise ValueError(f"mask_probs must be (Q, h', w'), got shape {tuple(mask_probs.shape)}")
        if mask_probs.shape[1:] != semantic_features.shape[:2]:
            raise ValueError(f"grid sizes differ: mask_probs {tuple(mask_probs.shape[1:])}, "
                             f"semantic_features {tuple(semantic_features.shape[:2])}")


@torch.no_grad()
def semantic_label_map(
    semantic_features: torch.Tensor, text_embeddings: torch.Tensor, placement: Placement
) -> torch.Tensor:
    """Semantic segmentation (reference §3.2): argmax over concepts of the cosine logits resampled to ``(H, W)``.

    ``resample.resample_argmax_to_image`` interpolates the ``(C, h', w')`` logits only between grid cells whose
    corners disagree on the argmax, in bounded chunks, so memory stays small for any ``C``. (Resampling the
    ``E``-dim features first, the "exact equivalent" of §3.2, would cost ``C * E`` multiply-adds per output
    pixel instead of ``4 * C``.) Equal logits resolve to the lowest concept index.

    Args:
        semantic_features: ``(h', w', E)`` unit-norm text-space features.
        text_embeddings: ``(C, E)`` unit-norm, background at index 0.
        placement: where the image sits in the network input (letterbox or native size).

    Returns:
        ``(H, W)`` int64 concept indices on the features' device.
    """
    _check_outputs(None, semantic_features, text_embeddings)
    feats = semantic_features.float()
    text = text_embeddings.to(device=feats.device, dtype=torch.float32)
    logits = torch.einsum("hwe,ce->chw", feats, text)  # no temperature: argmax only
    return resample_argmax_to_image(logits, placement)


@torch.no_grad()
def instance_candidates(
    mask_probs: torch.Tensor,
    semantic_features: torch.Tensor,
    text_embeddings: torch.Tensor,
    params: InferenceParams,
    valid_hw: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score and classify every query from the low-res proposals (reference §3.3 steps 1-4, Algorithm 1).

    Per query: ``binary = p > t``; ``area = sum(binary)``; objectness ``sum(p * binary) / (area + 1e-7)``; the
    text-space features averaged over ``binary`` (divided by ``area + 1e-7``) and L2-normalised (``+ 1e-7``);
    class probabilities ``sigmoid(temperature * cos)``; label = argmax (0 is background); score = objectness x
    the max probability. Queries labelled background or with empty masks are dropped.

    Args:
        mask_probs: ``(Q, h', w')`` proposal probabilities in [0, 1].
        semantic_features: ``(h', w', E)`` unit-norm; text_embeddings: ``(C, E)`` unit-norm.
        params: ``mask_threshold`` and ``temperature`` are used.
        valid_hw: if given, only the top-left ``(vh, vw)`` grid cells (those over the unpadded image, see
            ``resample.valid_grid_hw``) count; default the whole grid.

    Returns:
        ``(keep_idx, scores, labels)``: ``(K,)`` int64 query indices (ascending), their ``(K,)`` float32 scores
        and ``(K,)`` int64 labels in ``[1, C)``, on the inputs' device.
    """
    _check_outputs(mask_probs, semantic_features, text_embeddings)
    probs = mask_probs.float()
    feats = semantic_features.float()
    if valid_hw is not None:
        vh, vw = valid_hw
        probs, feats = probs[:, :vh, :vw], feats[:vh, :vw]
    text = text_embeddings.to(device=probs.device, dtype=torch.float32)
    q, gh, gw = probs.shape
    binary = (probs > params.mask_threshold).reshape(q, gh * gw).to(torch.float32)  # (Q, P)
    flat_probs = probs.reshape(q, gh * gw)
    area = binary.sum(dim=1)
    objectness = (flat_probs * binary).sum(dim=1) / (area + 1e-7)
    mean_feat = (binary @ feats.reshape(-1, feats.shape[-1])) / (area[:, None] + 1e-7)  # (Q, E)
    mean_feat = mean_feat / (mean_feat.norm(dim=1, keepdim=True) + 1e-7)
    class_probs = torch.sigmoid(params.temperature * (mean_feat @ text.T))  # (Q, C)
    max_prob, labels = class_probs.max(dim=1)
    scores = objectness * max_prob
    keep_idx = torch.nonzero((labels != 0) & (area > 0)).flatten()
    return keep_idx, scores[keep_idx], labels[keep_idx]


@torch.no_grad()
def select_instances(
    mask_probs: torch.Tensor,
    semantic_features: torch.Tensor,
    text_embeddings: torch.Tensor,
    placement: Placement,
    params: InferenceParams,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The instances of one image at its original ``(H, W)``, before encoding (steps of :func:`postprocess`).

    Returns:
        ``(masks, scores, labels, areas)``: ``(N, H, W)`` bool, ``(N,)`` float32, ``(N,)`` int64 concept indices
        and ``(N,)`` int64 pixel counts, by descending score, on the inputs' device.
    """
    valid = valid_grid_hw(placement, mask_probs.shape[1:])
    keep_idx, scores, labels = instance_candidates(mask_probs, semantic_features, text_embeddings, params, valid)
    # Only the surviving candidates are resampled (the others are discarded anyway, reference §7.4.4).
    masks = resample_masks_to_image(mask_probs[keep_idx], placement, params.mask_threshold)
    # Empty full-resolution masks (IoU 0 with everything) suppress nothing; dropping them after NMS rather than
    # before avoids copying every mask, and gives the same result given the score filter that follows.
    kept = mask_nms(masks, scores, labels, params.nms_iou, params.score_threshold)
    masks, scores, labels = masks[kept], scores[kept], labels[kept]
    areas = mask_areas(masks)
    final = torch.nonzero((areas > 0) & (scores.to(torch.float64) > params.score_threshold)).flatten()
    final = final[: params.max_instances]
    return masks[final], scores[final], labels[final], areas[final]


def instance_records(masks: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, areas: torch.Tensor,
                     vocabulary: list[str]) -> list[InstancePrediction]:
    """:func:`select_instances`' tensors -> one ``InstancePrediction`` each (its bool mask a view of ``masks``,
    box, plain numbers)."""
    boxes = masks_to_boxes_xywh(masks).cpu().tolist()
    return [
        InstancePrediction(concept_index=int(lab), concept=vocabulary[int(lab)], score=float(s),
                           bbox_xywh=tuple(float(v) for v in box), area=int(a), mask=mask)
        for lab, s, box, a, mask in zip(labels.cpu().tolist(), scores.cpu().tolist(), boxes,
                                        areas.cpu().tolist(), masks)
    ]


@torch.no_grad()
def postprocess(
    mask_probs: torch.Tensor,
    semantic_features: torch.Tensor,
    text_embeddings: torch.Tensor,
    vocabulary: list[str],
    placement: Placement,
    params: InferenceParams,
    semantic: bool = True,
) -> Prediction:
    """One image's network outputs -> ``Prediction`` (instances and, optionally, the semantic map).

    Candidates are scored at low resolution (:func:`instance_candidates`, over the grid cells covering the
    unpadded image); the surviving masks are resampled to ``(H, W)`` and thresholded; class-wise hard NMS (IoU
    ``> params.nms_iou``, floor ``params.score_threshold``); then non-empty instances with
    ``score > params.score_threshold`` are kept, by descending score (ties by query index), at most
    ``params.max_instances``.

    Unlike the release, the best candidate of a class is not returned when its score is ``<= score_threshold``
    (with the default parameters no score can be that low: scores exceed ``0.5 * sigmoid(-5) ~ 0.0034``).

    Args:
        mask_probs: ``(Q, h', w')`` proposal probabilities (last decoder layer).
        semantic_features: ``(h', w', E)`` unit-norm text-space features.
        text_embeddings: ``(C, E)`` unit-norm concept embeddings, background at index 0.
        vocabulary: the ``C`` concept names, background first.
        placement: where the image sits in the network input (``geometry.Letterbox`` or ``native.NativeSize``;
            gives ``(H, W)``).
        params: post-processing parameters.
        semantic: also compute the semantic label map.
    """
    _check_outputs(mask_probs, semantic_features, text_embeddings)
    c = text_embeddings.shape[0]
    if len(vocabulary) != c:
        raise ValueError(f"{len(vocabulary)} concept names for {c} text embeddings")
    if c > 65536:
        raise ValueError(f"at most 65536 concepts fit a uint16 label map, got {c}")
    instances = instance_records(*select_instances(mask_probs, semantic_features, text_embeddings, placement, params),
                                 vocabulary)
    label_map = None
    if semantic:
        label_map = semantic_label_map(semantic_features, text_embeddings, placement).cpu().numpy()
        label_map = label_map.astype(np.uint16)
    return Prediction(image_hw=placement.image_hw, concepts=list(vocabulary), instances=instances,
                      semantic=label_map)


__all__ = ["InstancePrediction", "Prediction", "semantic_label_map", "instance_candidates", "select_instances",
           "instance_records", "postprocess"]
