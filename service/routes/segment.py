"""POST /segment: one image and a concept list in, instances and a semantic map out (``SegmentResponse``)."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, BinaryIO, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response

from model.config import InferenceParams
from model.predictor import PreparedImage, Predictor
from model.text import with_background
from service.schema import SegmentResponse, SemanticFormat
from service.auth import ApiKey
from service.concepts import parse_concepts
from service.dependencies import EngineDep, MetricsDep, SettingsDep
from service.engine import Answer, Engine, Job
from service.errors import ErrorBody, ServiceError
from service.upload import decode_image

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
    metrics: MetricsDep,
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
    arrived = time.perf_counter()
    deadline = arrived + settings.request_timeout_s
    concepts = parse_concepts(concepts, settings.max_concepts, settings.max_concept_length)
    if max_instances is not None and max_instances > settings.max_instances:
        raise ServiceError("invalid_request", f"max_instances={max_instances} is above this service's limit of "
                           f"{settings.max_instances}")
    with engine.admission():
        predictor = engine.predictor
        assert predictor is not None  # admission() only admits once the model is loaded
        try:
            params = predictor.params(score_threshold=score_threshold, mask_threshold=mask_threshold,
                                      nms_iou=nms_iou, max_instances=max_instances)
        except ValueError as exc:
            raise ServiceError("invalid_request", str(exc)) from None
        if params.max_instances > settings.max_instances:
            params = params.with_overrides(max_instances=settings.max_instances)
        # The upload is read in the pool: only the jobs being decoded hold image bytes in memory; waiting ones keep
        # Starlette's spooled file (at most 1 MB in memory, the rest on disk).
        try:
            job = await engine.run_in_pool(_prepare_job, predictor, engine, image.file, concepts, params, semantic,
                                           settings.max_image_pixels, settings.exif_orientation, arrived, deadline)
            answer = await _await_answer(request, engine, job, settings.request_timeout_s)
        except asyncio.CancelledError:
            if not engine.refusing:
                raise
            # uvicorn cancels what is left when the drain timeout passes: answer 503 rather than its plain 500.
            raise ServiceError("draining", "the service shut down before the answer was ready (drain timeout); "
                               "retry on another replica", {"Retry-After": str(settings.retry_after_s),
                                                            "Connection": "close"}) from None
    return Response(answer.body, media_type="application/json", headers={
        "x-queue-time": f"{answer.timings.queue_ms:.3f}",
        "x-inference-time": f"{answer.timings.inference_ms:.3f}",
        "x-total-time": f"{answer.timings.total_ms:.3f}",
        "x-batch-size": str(answer.batch_size),
        "x-model-id": predictor.model_id,
    })


def _prepare_job(predictor: Predictor, engine: Engine, upload: BinaryIO, concepts: list[str],
                 params: InferenceParams, semantic: SemanticFormat, max_pixels: int, exif_orientation: bool,
                 arrived: float, deadline: float) -> Job:
    """Pool thread: read, decode and letterbox the image, fetch the concepts' text embeddings (cached)."""
    upload.seek(0)
    image = decode_image(upload.read(), max_pixels, exif_orientation)
    prepared = _prepare_image(predictor, image)
    vocabulary = with_background(concepts)
    text_embeddings = predictor.encode_vocabulary(vocabulary, engine.cache)
    return Job(prepared=prepared, vocabulary=vocabulary, text_embeddings=text_embeddings, params=params,
               semantic=semantic, arrived=arrived, deadline=deadline)


def _prepare_image(predictor: Predictor, image: Any) -> PreparedImage:
    """The network input of a decoded image; an image the geometry cannot take (in native geometry, a side
    shorter than one patch) is a 400."""
    try:
        return predictor.prepare(image)
    except ValueError as exc:
        raise ServiceError("invalid_image", str(exc)) from None


async def _await_answer(request: Request, engine: Engine, job: Job, timeout_s: float) -> Answer:
    """Queue ``job`` and wait for its answer, its deadline, or the client going away (whichever comes first).

    A job given up on is cancelled: if its forward pass has not started, it never reaches the model.
    """
    if time.perf_counter() > job.deadline:
        raise ServiceError("deadline_exceeded", f"the request's deadline of {timeout_s:g} s passed before it "
                           "could be queued")
    answer = asyncio.wrap_future(engine.submit(job))
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        done, _ = await asyncio.wait({answer, gone}, timeout=max(0.0, job.deadline - time.perf_counter()),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not answer.done():
            answer.cancel()
    if answer in done:
        return answer.result()
    if gone in done:
        raise ServiceError("client_disconnected", "the client closed the connection before the answer was ready")
    raise ServiceError("deadline_exceeded", f"no answer within the request deadline of {timeout_s:g} s")


async def _client_gone(request: Request) -> None:
    """Return when the client disconnects (the body has been read, so the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
