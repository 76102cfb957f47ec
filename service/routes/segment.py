"""POST /segment: one image and a concept list in, instances and a semantic map out (``SegmentResponse``).

The route parses and checks the form, then makes one call, ``Engine.segment``; everything from admission to the
encoded answer happens there.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response

from service.auth import ApiKey
from service.concepts import parse_concepts
from service.dependencies import EngineDep, SettingsDep
from service.engine import Deadline
from service.errors import ErrorBody, ServiceError
from service.schema import SegmentResponse

router = APIRouter()

_ERRORS = {code: {"model": ErrorBody, "description": text} for code, text in {
    400: "the body could not be parsed, or the image could not be decoded",
    401: "missing or wrong API key",
    413: "body or image over the limits",
    415: "not an image in a supported format",
    422: "missing field or bad parameter value",
    503: "not ready, draining, or at capacity (see Retry-After)",
    504: "the request's deadline passed",
}.items()}


@router.post("/segment", response_model=SegmentResponse, responses=_ERRORS, summary="Segment an image",
             description="Instances (COCO RLE) and a semantic map for any list of concepts. Requests with "
                         "different concepts share batched forward passes. Queue and inference time are also "
                         "returned as the `x-queue-time`, `x-inference-time` and `x-total-time` headers (ms).")
async def segment(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    _: ApiKey,
    image: Annotated[UploadFile, File(description="the image (PNG, JPEG, WebP, BMP, GIF, TIFF)")],
    concepts: Annotated[list[str], Form(description="concept names: repeat the field and/or separate with "
                                                    "commas; 'background' is always added as concept 0")],
    # allow_inf_nan=False: "nan" is answered "should be a finite number", not "should be less than or equal to 1".
    score_threshold: Annotated[float | None, Form(allow_inf_nan=False, ge=0.0, le=1.0,
                                                  description="minimum instance score")] = None,
    mask_threshold: Annotated[float | None, Form(allow_inf_nan=False, ge=0.0, lt=1.0,
                                                 description="mask probability cut")] = None,
    nms_iou: Annotated[float | None, Form(allow_inf_nan=False, ge=0.0, le=1.0,
                                          description="class-wise mask NMS IoU")] = None,
    max_instances: Annotated[int | None, Form(ge=0, description="most instances returned")] = None,
    semantic: Annotated[Literal["png", "rle", "none"], Form(description="semantic map encoding")] = "png",
) -> Response:
    deadline = Deadline(time.perf_counter(), settings.request_timeout_s)
    # The form's raw values become the request's concepts (normalised, distinct), under the same name.
    concepts = parse_concepts(concepts, settings.max_concepts, settings.max_concept_length)
    if max_instances is not None and max_instances > settings.max_instances:
        raise ServiceError("invalid_request", f"max_instances={max_instances} is above this service's limit of "
                           f"{settings.max_instances}")
    overrides = {"score_threshold": score_threshold, "mask_threshold": mask_threshold, "nms_iou": nms_iou,
                 "max_instances": max_instances}
    answer = await engine.segment(image.file, concepts, overrides, semantic, deadline, partial(client_gone, request))
    return Response(answer.body, media_type="application/json", headers={
        "x-queue-time": f"{answer.timings.queue_ms:.3f}",
        "x-inference-time": f"{answer.timings.inference_ms:.3f}",
        "x-total-time": f"{answer.timings.total_ms:.3f}",
        "x-batch-size": str(answer.batch_size),
        "x-model-id": answer.model_id,
    })


async def client_gone(request: Request) -> None:
    """Return when the client disconnects (the body has been read, so the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
