"""POST /segment: one image and a concept list (or a named vocabulary) in, instances and a semantic map out.

Two bodies, the same fields (``service.request``): a multipart form (``curl -F image=@photo.jpg -F
concepts=cat``) or a JSON object (``{"image": "<base64 or data URI>", "concepts": ["cat"]}``). The route builds the
typed request at the edge, then makes one call, ``Engine.segment``; everything from admission to the encoded answer
happens there.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from service.auth import ApiKey
from service.dependencies import EngineDep, SettingsDep
from service.engine import Answer, Deadline
from service.errors import ErrorBody
from service.image_url import UrlImage, UrlPolicy, check_url
from service.request import (ImageSource, Limits, SegmentFormBody, SegmentJSONBody, SegmentRequest, parse_form,
                             parse_json)
from service.schema import SegmentResponse
from service.settings import Settings

router = APIRouter()

JSON_MEDIA_TYPE = "application/json"

_ERRORS = {code: {"model": ErrorBody, "description": text} for code, text in {
    400: "the body could not be parsed, the image could not be decoded, bad base64, or image_url not fetched",
    401: "missing or wrong API key",
    413: "body or image over the limits",
    415: "not an image in a supported format (or a data URI of another type)",
    422: "missing, unknown or repeated field, or a bad parameter value (the field is named)",
    503: "not ready, draining, or at capacity (see Retry-After)",
    504: "the request's deadline passed",
}.items()}


def _body_schema(model: type[SegmentRequest], binary_image: bool) -> dict[str, Any]:
    """The OpenAPI schema of one request body (no references: every field is a plain value)."""
    schema = model.model_json_schema()
    if binary_image:  # a file input in /docs
        schema["properties"]["image"] = {"type": "string", "format": "binary",
                                         "description": "the image file (PNG, JPEG, WebP, BMP, GIF, TIFF)"}
    return schema


REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": _body_schema(SegmentFormBody, binary_image=True)},
    JSON_MEDIA_TYPE: {"schema": _body_schema(SegmentJSONBody, binary_image=False)},
}}}


@router.post("/segment", response_model=SegmentResponse, responses=_ERRORS, summary="Segment an image",
             openapi_extra=REQUEST_BODY,
             description="Instances (COCO RLE or polygons) and a semantic map for any list of concepts, or a named "
                         "vocabulary. The body is a multipart form (image as a file) or a JSON object (image as "
                         "base64 or a data URI); the body limit applies to the body as sent (base64 is about 4/3 "
                         "of the file). Requests with different concepts share batched forward passes. Queue and "
                         "inference time are also returned as the `x-queue-time`, `x-inference-time` and "
                         "`x-total-time` headers (ms).")
async def segment(request: Request, engine: EngineDep, settings: SettingsDep, _: ApiKey) -> Response:
    deadline = Deadline(time.perf_counter(), settings.request_timeout_s)
    limits = Limits(settings.max_concepts, settings.max_concept_length, settings.max_instances)
    gone = partial(client_gone, request)
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type == JSON_MEDIA_TYPE:
        # json.loads and the base64 decoding of a large body take a while (174 ms for a 32 MB body here): off the loop
        image, segment_request = await run_in_threadpool(parse_json, await request.body(), limits)
        answer = await engine.segment(_image_source(image, settings), segment_request, deadline, gone)
        return _response(answer)
    async with request.form() as form:  # the upload's spooled file is closed once answered
        image, segment_request = parse_form(form, limits)
        answer = await engine.segment(_image_source(image, settings), segment_request, deadline, gone)
    return _response(answer)


def _image_source(image: ImageSource | str, settings: Settings) -> ImageSource:
    """An ``image_url`` (a string) becomes a fetch, once the policy allows it; anything else is read as it is."""
    if not isinstance(image, str):
        return image
    policy = UrlPolicy.from_list(settings.image_url_host_list())
    check_url(image, policy)
    return UrlImage(image, policy, settings.image_url_timeout_s, settings.max_body_bytes)


def _response(answer: Answer) -> Response:
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
