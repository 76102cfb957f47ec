"""The HTTP answer of ``POST /segment`` (pydantic models), also printed by ``python -m model.predict``.

Instances follow COCO / segment-anything conventions: ``bbox`` is ``[x, y, w, h]`` in pixels, ``segmentation``
is COCO compressed RLE (``pycocotools.mask.decode`` reads it directly; ``counts`` is a string). The semantic map
is either a base64 PNG of per-pixel indices into ``concepts`` or one RLE per concept present.

Importing this module loads pydantic only (no torch, FastAPI or uvicorn): ``service/__init__.py`` is empty, and
``build_response`` imports the mask encoders (``model.rle``, which loads torch) when it first runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

if TYPE_CHECKING:  # only an annotation here: model.postprocess loads torch
    from model.postprocess import Prediction

SemanticFormat = Literal["png", "rle", "none"]
SCORE_DECIMALS = 6


class RLE(BaseModel):
    size: list[int] = Field(description="[height, width] of the mask in pixels")
    counts: str = Field(description="COCO compressed RLE counts")


class Instance(BaseModel):
    concept: str
    concept_index: int = Field(description="index into `concepts` (0 is background, never an instance)")
    score: float = Field(description="mask confidence x class probability, in [0, 1]")
    bbox: list[float] = Field(description="[x, y, width, height] in pixels")
    area: int = Field(description="mask area in pixels")
    segmentation: RLE


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


def build_response(prediction: Prediction, model_id: str, semantic: SemanticFormat = "png",
                   timings: Timings | None = None) -> SegmentResponse:
    """The JSON answer for one image's ``Prediction`` (its ``concepts`` are the vocabulary, background first).

    ``semantic`` chooses the encoding of the semantic map (``none``, or no map in the prediction: no map).
    """
    # Deferred, unlike the rest: model.rle loads torch, which importing the answer's models must not.
    from model.rle import encode_semantic_png, encode_semantic_rle

    h, w = prediction.image_hw
    semantic_map = None
    if semantic != "none" and prediction.semantic is not None:
        if semantic == "png":
            semantic_map = SemanticMap(format="png", png=encode_semantic_png(prediction.semantic))
        else:
            items = encode_semantic_rle(prediction.semantic, len(prediction.concepts))
            semantic_map = SemanticMap(format="rle", segments=[
                SemanticSegment(concept_index=i["concept_index"], concept=prediction.concepts[i["concept_index"]],
                                segmentation=RLE(**i["segmentation"])) for i in items])
    instances = [
        Instance(concept=inst.concept, concept_index=inst.concept_index,
                 score=round(float(inst.score), SCORE_DECIMALS), bbox=[float(v) for v in inst.bbox_xywh],
                 area=int(inst.area), segmentation=RLE(**inst.segmentation))
        for inst in prediction.instances
    ]
    return SegmentResponse(model=model_id, image=ImageSize(width=w, height=h), concepts=list(prediction.concepts),
                           instances=instances, semantic=semantic_map, timings=timings or Timings())
