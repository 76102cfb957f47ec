"""The answer: its JSON shape (pydantic models) and the one encoder of a ``Prediction`` into it.

The service (``POST /segment``), ``python -m model.predict`` and the evaluation all encode predictions here, so
they print the same JSON. Instances follow COCO / segment-anything conventions: ``bbox`` is ``[x, y, w, h]`` in
pixels; ``segmentation`` is COCO compressed RLE (``mask_format="rle"``, the default; ``counts`` is a string,
``pycocotools.mask.decode`` reads it directly) or COCO polygons (``mask_format="polygon"``: ``[[x1, y1, x2, y2,
...], ...]``, one ring per connected part, holes filled; see ``model.polygon``). The semantic map is either a
base64 PNG of per-pixel indices into ``concepts`` or one RLE per concept present.

Importing this module loads pydantic only; the mask encoders (``model.rle``, which loads torch; ``model.polygon``,
OpenCV) are imported when an answer is first encoded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np
from pydantic import BaseModel, Field

if TYPE_CHECKING:  # only annotations here: model.postprocess loads torch
    from model.postprocess import InstancePrediction, Prediction

SemanticFormat = Literal["png", "rle", "none"]
MaskFormat = Literal["rle", "polygon"]
SCORE_DECIMALS = 6
DEFAULT_POLYGON_TOLERANCE = 1.0


@dataclass(frozen=True)
class AnswerFormat:
    """How an answer encodes its masks: ``semantic`` map as ``png``, ``rle`` or ``none``; instance masks as
    ``rle`` or ``polygon`` (simplified to within ``polygon_tolerance`` pixels, >= 0)."""

    semantic: SemanticFormat = "png"
    mask_format: MaskFormat = "rle"
    polygon_tolerance: float = DEFAULT_POLYGON_TOLERANCE


# -- the JSON shape ----------------------------------------------------------------------------------------------
class RLE(BaseModel):
    size: list[int] = Field(description="[height, width] of the mask in pixels")
    counts: str = Field(description="COCO compressed RLE counts")


Polygon = list[float]


class Instance(BaseModel):
    concept: str
    concept_index: int = Field(description="index into `concepts` (0 is background, never an instance)")
    score: float = Field(description="mask confidence x class probability, in [0, 1]")
    bbox: list[float] = Field(description="[x, y, width, height] in pixels")
    area: int = Field(description="mask area in pixels")
    segmentation: Union[RLE, list[Polygon]] = Field(
        description="COCO compressed RLE (mask_format=rle), or COCO polygons (mask_format=polygon): one "
                    "[x1, y1, x2, y2, ...] ring per connected part, in pixels (pixel edges at whole numbers); "
                    "polygons cannot carry holes")


class SemanticSegment(BaseModel):
    concept_index: int
    concept: str
    segmentation: RLE


class SemanticMap(BaseModel):
    format: Literal["png", "rle"]
    png: str | None = Field(None, description="base64 PNG (8-bit, or 16-bit past 255 concepts) of concept indices")
    segments: list[SemanticSegment] | None = Field(None, description="one RLE per concept present (format rle)")


class ImageSize(BaseModel):
    width: int
    height: int


class Timings(BaseModel):
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    total_ms: float = 0.0


class SegmentResponse(BaseModel):
    model: str = Field(description="checkpoint id: model name @ first 12 hex digits of the file's sha256")
    image: ImageSize
    concepts: list[str] = Field(description="the vocabulary used: background first, then the request's concepts")
    instances: list[Instance]
    semantic: SemanticMap | None = None
    timings: Timings = Field(default_factory=Timings)


# -- encoding ----------------------------------------------------------------------------------------------------
def encode_answer(prediction: Prediction, model_id: str, answer_format: AnswerFormat = AnswerFormat(),
                  timings: Timings | None = None) -> SegmentResponse:
    """The JSON answer for one image's ``Prediction`` (its ``concepts`` are the vocabulary, background first).

    Instance masks are encoded as ``answer_format.mask_format`` says; the semantic map as
    ``answer_format.semantic`` says (``none``, or no map in the prediction: no map).
    """
    h, w = prediction.image_hw
    semantic_map = None
    if answer_format.semantic != "none" and prediction.semantic is not None:
        semantic_map = encode_semantic_map(prediction.semantic, prediction.concepts, answer_format.semantic)
    segmentations = encode_instance_masks(prediction.instances, (h, w), answer_format)
    instances = [
        Instance(concept=inst.concept, concept_index=inst.concept_index,
                 score=round(float(inst.score), SCORE_DECIMALS), bbox=[float(v) for v in inst.bbox_xywh],
                 area=int(inst.area), segmentation=segmentation)
        for inst, segmentation in zip(prediction.instances, segmentations)
    ]
    return SegmentResponse(model=model_id, image=ImageSize(width=w, height=h), concepts=list(prediction.concepts),
                           instances=instances, semantic=semantic_map, timings=timings or Timings())


def build_response(prediction: Prediction, model_id: str, semantic: SemanticFormat = "png",
                   timings: Timings | None = None, *, mask_format: MaskFormat = "rle",
                   polygon_tolerance: float = DEFAULT_POLYGON_TOLERANCE) -> SegmentResponse:
    """:func:`encode_answer` with the format given field by field."""
    return encode_answer(prediction, model_id, AnswerFormat(semantic, mask_format, polygon_tolerance), timings)


def encode_instance_masks(instances: Sequence[InstancePrediction], image_hw: tuple[int, int],
                          answer_format: AnswerFormat) -> list[RLE | list[Polygon]]:
    """Each instance's ``(H, W)`` bool ``mask`` as RLE (all at once, see ``model.rle.encode_masks``) or as
    polygons (``model.polygon.mask_to_polygons``)."""
    if not instances:
        return []
    if answer_format.mask_format == "polygon":
        from model.polygon import mask_to_polygons
        from model.rle import as_numpy

        return [mask_to_polygons(as_numpy(inst.mask), answer_format.polygon_tolerance) for inst in instances]
    if answer_format.mask_format != "rle":
        raise ValueError(f"unknown mask format {answer_format.mask_format!r}; use rle or polygon")
    return [RLE(**rle) for rle in _rles(instances)]


def _rles(instances: Sequence[InstancePrediction]) -> list[dict[str, Any]]:
    """COCO RLEs of the instances' masks, in one batched encode."""
    import torch

    from model.rle import as_numpy, encode_masks

    masks = [inst.mask for inst in instances]
    if all(isinstance(m, torch.Tensor) for m in masks):
        return encode_masks(_stacked(masks))
    return encode_masks(np.stack([as_numpy(m) for m in masks]))


def _stacked(masks: list[Any]) -> Any:
    """``(N, H, W)`` of ``N`` mask tensors: the tensor they are consecutive views of (the predictor's, no copy),
    else a stacked copy."""
    import torch

    base = masks[0]._base
    if base is not None and base.dim() == 3 and base.shape[0] == len(masks) and base.is_contiguous() and all(
            m._base is base and m.storage_offset() == base.storage_offset() + k * m.numel()
            for k, m in enumerate(masks)):
        return base
    return torch.stack(masks)


def encode_semantic_map(label_map: np.ndarray, concepts: Sequence[str], semantic: SemanticFormat) -> SemanticMap:
    """An ``(H, W)`` label map (indices into ``concepts``) as a base64 PNG or one RLE per concept present."""
    from model.rle import encode_semantic_png, encode_semantic_rle

    if semantic == "png":
        return SemanticMap(format="png", png=encode_semantic_png(label_map))
    if semantic != "rle":
        raise ValueError(f"unknown semantic format {semantic!r}; use png, rle or none")
    items = encode_semantic_rle(label_map, len(concepts))
    return SemanticMap(format="rle", segments=[
        SemanticSegment(concept_index=i["concept_index"], concept=concepts[i["concept_index"]],
                        segmentation=RLE(**i["segmentation"])) for i in items])


# -- decoding ----------------------------------------------------------------------------------------------------
def segmentation_to_rle(segmentation: Any, image_hw: tuple[int, int]) -> dict[str, Any]:
    """An answer's ``segmentation`` in either format (an ``RLE`` model or dict, or a polygon list) as a COCO RLE
    dict ``{"size": [H, W], "counts": str}`` of an ``image_hw`` image (what COCO evaluation reads)."""
    if isinstance(segmentation, RLE):
        segmentation = segmentation.model_dump()
    if isinstance(segmentation, Mapping):
        counts = segmentation["counts"]
        return {"size": [int(v) for v in segmentation["size"]],
                "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
    from model.polygon import polygons_to_mask
    from model.rle import encode_masks

    return encode_masks(polygons_to_mask(segmentation, image_hw)[None])[0]


def segmentation_to_mask(segmentation: Any, image_hw: tuple[int, int]) -> np.ndarray:
    """An answer's ``segmentation`` in either format as an ``(H, W)`` bool mask."""
    if isinstance(segmentation, (RLE, Mapping)):
        from model.rle import decode_rle

        return decode_rle(segmentation_to_rle(segmentation, image_hw))
    from model.polygon import polygons_to_mask

    return polygons_to_mask(segmentation, image_hw)


__all__ = ["AnswerFormat", "SemanticFormat", "MaskFormat", "SCORE_DECIMALS", "DEFAULT_POLYGON_TOLERANCE", "RLE",
           "Instance", "SemanticSegment", "SemanticMap", "ImageSize", "Timings", "SegmentResponse",
           "encode_answer", "build_response", "encode_instance_masks", "encode_semantic_map",
           "segmentation_to_rle", "segmentation_to_mask"]
