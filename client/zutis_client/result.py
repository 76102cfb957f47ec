"""The answer of ``POST /segment`` as typed objects: instances with masks decoded on demand, the semantic map."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Union

import numpy as np
from PIL import Image

from zutis_client.errors import ZutisError, ZutisUsageError
from zutis_client.polygon import decode_polygons
from zutis_client.rle import decode_rle

Segmentation = Union[Mapping[str, Any], Sequence[Sequence[float]]]  # COCO RLE, or COCO polygons


@dataclass(frozen=True)
class Instance:
    """One segmented object.

    Attributes:
        concept: the concept's name (normalised by the service: lower case, single spaces).
        concept_index: index into ``SegmentResult.concepts`` (0 is background, never an instance).
        score: confidence in [0, 1].
        bbox: ``[x, y, width, height]`` in pixels (COCO).
        area: mask area in pixels.
        segmentation: the COCO compressed RLE, ``{"size": [h, w], "counts": str}`` (``mask_format="rle"``, the
            default), or COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` (``mask_format="polygon"``: one ring per
            connected part, holes filled).
        image_hw: ``(height, width)`` of the image, which polygons need to become a mask.
    """

    concept: str
    concept_index: int
    score: float
    bbox: tuple[float, float, float, float]
    area: int
    segmentation: Segmentation
    image_hw: tuple[int, int] | None = None

    @property
    def mask_format(self) -> str:
        """``rle`` or ``polygon``: how ``segmentation`` encodes the mask."""
        return "rle" if isinstance(self.segmentation, Mapping) else "polygon"

    @cached_property
    def mask(self) -> np.ndarray:
        """The mask, bool ``(H, W)``, decoded from the RLE or the polygons on first use."""
        if isinstance(self.segmentation, Mapping):
            return decode_rle(self.segmentation)
        if self.image_hw is None:
            raise ZutisUsageError("invalid_argument", "polygons need the image size: build the instance with image_hw")
        return decode_polygons(self.segmentation, self.image_hw)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], image_hw: tuple[int, int] | None = None) -> Instance:
        segmentation = data["segmentation"]
        return cls(concept=data["concept"], concept_index=int(data["concept_index"]), score=float(data["score"]),
                   bbox=tuple(float(v) for v in data["bbox"]), area=int(data["area"]),  # type: ignore[arg-type]
                   segmentation=dict(segmentation) if isinstance(segmentation, Mapping)
                   else [list(ring) for ring in segmentation], image_hw=image_hw)


@dataclass(frozen=True)
class SegmentResult:
    """One image's answer. ``raw`` is the JSON as the service sent it.

    Attributes:
        model: the checkpoint id that answered.
        width, height: the image size in pixels.
        concepts: the vocabulary, background first, then the request's concepts (normalised, deduplicated).
        instances: sorted by score, best first.
        timings: ``queue_ms``, ``inference_ms``, ``total_ms`` measured by the service.
    """

    model: str
    width: int
    height: int
    concepts: list[str]
    instances: list[Instance]
    timings: dict[str, float]
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SegmentResult:
        """The typed answer of the service's JSON.

        Raises:
            ZutisError: ``invalid_answer``, the JSON is not a segmentation answer (a field missing or of the
                wrong type): a proxy's or another service's answer, never a transport failure.
        """
        try:
            hw = (int(data["image"]["height"]), int(data["image"]["width"]))
            return cls(model=data["model"], width=hw[1], height=hw[0], concepts=list(data["concepts"]),
                       instances=[Instance.from_json(i, hw) for i in data["instances"]],
                       timings=dict(data.get("timings") or {}), raw=data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ZutisError("invalid_answer", f"the answer is not a segmentation answer ({type(exc).__name__}: "
                                               f"{exc})") from exc

    def masks(self) -> np.ndarray:
        """Every instance's mask, bool ``(N, H, W)`` in the order of ``instances``."""
        if not self.instances:
            return np.zeros((0, self.height, self.width), dtype=bool)
        return np.stack([instance.mask for instance in self.instances])

    @cached_property
    def semantic_map(self) -> np.ndarray | None:
        """Per-pixel index into ``concepts``, int32 ``(H, W)`` (0 = background); None when the request asked for
        ``semantic="none"``."""
        semantic = self.raw.get("semantic")
        if not semantic:
            return None
        if semantic["format"] == "png":
            with Image.open(io.BytesIO(base64.b64decode(semantic["png"]))) as picture:
                indices = np.asarray(picture).astype(np.int32)
        else:
            indices = np.zeros((self.height, self.width), dtype=np.int32)
            for segment in semantic["segments"] or []:
                indices[decode_rle(segment["segmentation"])] = int(segment["concept_index"])
        if indices.shape != (self.height, self.width):
            raise ZutisError("invalid_answer", f"semantic map of shape {indices.shape}, image "
                                               f"{self.height} x {self.width}")
        return indices

    def overlay(self, image: Any, alpha: float = 0.5, labels: bool = True) -> Image.Image:
        """The image with every instance's mask blended in its own colour, outlined by its box and labelled
        with concept and score. ``image``: a path, bytes, a PIL image or an ``(H, W, 3)`` uint8 array of the
        image that was sent."""
        from zutis_client.overlay import overlay_image

        return overlay_image(image, self, alpha=alpha, labels=labels)

    def to_coco(self, image_id: int, category_ids: Mapping[str, int]) -> list[dict[str, Any]]:
        """The instances as COCO results records (``image_id``, ``category_id``, ``segmentation``, ``bbox``,
        ``score``), the format ``pycocotools.coco.COCO.loadRes`` reads. ``category_ids`` maps concept names (as
        in ``concepts``) to category ids.

        Raises:
            KeyError: an instance's concept has no category id.
        """
        return [{"image_id": image_id, "category_id": category_ids[i.concept],
                 "segmentation": dict(i.segmentation) if isinstance(i.segmentation, Mapping)
                 else [list(ring) for ring in i.segmentation],
                 "bbox": list(i.bbox), "score": i.score} for i in self.instances]
