"""Operations endpoints: /healthz (liveness), /readyz (readiness), /info (what is serving), /metrics."""

from __future__ import annotations

from typing import Any, get_args

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel, Field

from model.answer import MaskFormat
from model.backbone import describe
from service.admission import EngineState
from service.auth import ApiKey
from service.dependencies import EngineDep, MetricsDep, SettingsDep
from service.errors import ErrorBody, ServiceError, error_response
from service.metrics import CONTENT_TYPE
from service.request import VOCABULARY_NAMES
from service.version import VERSION

router = APIRouter()


class Status(BaseModel):
    status: str = Field(description="ok (alive) or ready")
    state: str = Field(description="engine state: loading, warming, ready, draining, stopped or failed")


class SourceFile(BaseModel):
    url: str
    sha256: str = Field(description="sha256 of the file as downloaded")
    verified: bool = Field(description="whether the manifest gave this sha256 and the file matched it")


class ZooInfo(BaseModel):
    name: str = Field(description="the zoo model's name, e.g. coco-vit-b16")
    files: dict[str, SourceFile] = Field(description="the official files it was converted from: zutis, clip")


def zoo_info(provenance: dict[str, Any]) -> ZooInfo | None:
    """The zoo part of a checkpoint's provenance (written by model.fetch), or None."""
    if "zoo_model" not in provenance:
        return None
    files = {kind: SourceFile(url=str(provenance.get(f"{kind}_url")), sha256=str(provenance.get(f"{kind}_sha256")),
                              verified=bool(provenance.get(f"{kind}_sha256_verified")))
             for kind in ("zutis", "clip")}
    return ZooInfo(name=str(provenance["zoo_model"]), files=files)


class Info(BaseModel):
    version: str
    state: str
    model_id: str = Field(description="model name @ first 12 hex digits of the checkpoint's sha256")
    checksum: str = Field(description="sha256 of the checkpoint file")
    checkpoint: str = Field(description="checkpoint file name")
    backbone: dict[str, Any]
    input_size: int = Field(description="letterbox size S, or the longer-side cap in native geometry (pixels)")
    geometry: str = Field(description="letterbox (every image in an S x S square) or native (each image at its "
                                      "own size, the official protocol)")
    dtype: str
    device: str
    dtype_reason: str = Field(description="why this precision (e.g. auto on a CPU with native bfloat16)")
    runtime: str = Field(description="what runs the image network: torch or openvino")
    runtime_reason: str = Field(description="why this runtime")
    vocabulary: list[str] = Field(description="the checkpoint's default concepts, background first: those it was "
                                              "trained on and those it was only evaluated on")
    trained_concepts: list[str] | None = Field(description="the concepts the model was trained on (null when the "
                                                           "checkpoint does not record it)")
    evaluated_only_concepts: list[str] | None = Field(
        description="default concepts held out of training: never trained on, only evaluated (zero-shot)")
    prompt_templates: list[str] | None
    inference_defaults: dict[str, Any]
    limits: dict[str, Any]
    batching: dict[str, Any]
    auth: bool = Field(description="whether /segment and /info need an API key")
    zoo: ZooInfo | None = Field(None, description="the zoo model the checkpoint was fetched as (ZUTIS_CHECKPOINT="
                                                  "zoo:NAME or python -m model.fetch); null for other checkpoints")
    vocabularies: list[str] = Field(description="names a request may send as `vocabulary` instead of `concepts`")
    mask_formats: list[str] = Field(description="values of `mask_format`: instance masks as COCO RLE or polygons")
    request_bodies: dict[str, Any] = Field(description="the content types POST /segment takes, and how the body "
                                                       "limit applies to them")
    image_url: dict[str, Any] = Field(description="whether `image_url` is on, and for which hosts")


@router.get("/healthz", response_model=Status, responses={500: {"model": ErrorBody}}, summary="Liveness")
async def healthz(engine: EngineDep) -> Any:
    """200 while the process works, also while loading and draining; 500 once the model failed to load."""
    if engine.state is EngineState.FAILED:
        return error_response("internal_error", f"the model failed to load: {engine.error}")
    return Status(status="ok", state=engine.state.value)


@router.get("/readyz", response_model=Status, responses={503: {"model": ErrorBody}}, summary="Readiness")
async def readyz(engine: EngineDep, settings: SettingsDep) -> Any:
    """200 once the model is loaded and warmed up; 503 before, while draining and after a failure."""
    state = engine.state
    if state is EngineState.READY:
        return Status(status="ready", state=state.value)
    retry = {"Retry-After": str(settings.retry_after_s)}
    if state is EngineState.DRAINING:
        return error_response("draining", "the service is shutting down", retry)
    return error_response("not_ready", f"the model is not ready yet ({state.value})", retry)


@router.get("/info", response_model=Info, responses={401: {"model": ErrorBody}, 503: {"model": ErrorBody}},
            summary="Model, limits and batching")
async def info(engine: EngineDep, settings: SettingsDep, _: ApiKey) -> Info:
    predictor = engine.predictor
    if predictor is None:
        raise ServiceError("not_ready", f"the model is not loaded yet ({engine.state.value})",
                           {"Retry-After": str(settings.retry_after_s)})
    meta = predictor.metadata
    split = meta.concept_split()
    return Info(version=VERSION, state=engine.state.value, model_id=predictor.model_id, checksum=predictor.sha256,
                checkpoint=predictor.checkpoint_path.name, backbone=describe(meta.model_config),
                input_size=predictor.input_size, geometry=predictor.geometry,
                dtype=str(predictor.dtype).removeprefix("torch."), device=str(predictor.device),
                dtype_reason=predictor.dtype_reason, runtime=predictor.runtime, runtime_reason=predictor.runtime_reason,
                vocabulary=list(meta.vocabulary), trained_concepts=split.trained if split else None,
                evaluated_only_concepts=split.evaluated_only if split else None,
                prompt_templates=meta.prompt_templates, inference_defaults=predictor.default_params.to_dict(),
                limits=settings.limits(), batching=settings.batching(), auth=settings.api_key is not None,
                zoo=zoo_info(meta.provenance),
                vocabularies=list(VOCABULARY_NAMES), mask_formats=list(get_args(MaskFormat)),
                request_bodies={
                    "content_types": ["multipart/form-data", "application/json"],
                    "max_body_bytes": settings.max_body_bytes,
                    "body_limit_applies_to": "the encoded body as sent: a JSON body's base64 image is about 4/3 "
                                             "of the image file",
                },
                image_url={"enabled": bool(settings.image_url_host_list()), "hosts": settings.image_url_host_list(),
                           "timeout_s": settings.image_url_timeout_s})


@router.get("/metrics", response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {CONTENT_TYPE: {}}}})
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE)
