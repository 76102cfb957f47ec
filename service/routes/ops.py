"""Operations endpoints: /healthz (liveness), /readyz (readiness), /info (what is serving), /metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel, Field

from model.backbone import describe
from service.admission import EngineState
from service.auth import ApiKey
from service.dependencies import EngineDep, MetricsDep, SettingsDep
from service.errors import ErrorBody, ServiceError, error_response
from service.metrics import CONTENT_TYPE
from service.version import VERSION

router = APIRouter()


class Status(BaseModel):
    status: str = Field(description="ok (alive) or ready")
    state: str = Field(description="engine state: loading, warming, ready, draining, stopped or failed")


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
    vocabulary: list[str] = Field(description="training vocabulary, background first")
    prompt_templates: list[str] | None
    inference_defaults: dict[str, Any]
    limits: dict[str, Any]
    batching: dict[str, Any]
    auth: bool = Field(description="whether /segment and /info need an API key")


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
    return Info(version=VERSION, state=engine.state.value, model_id=predictor.model_id, checksum=predictor.sha256,
                checkpoint=predictor.checkpoint_path.name, backbone=describe(meta.model_config),
                input_size=predictor.input_size, geometry=predictor.geometry,
                dtype=str(predictor.dtype).removeprefix("torch."), device=str(predictor.device),
                dtype_reason=predictor.dtype_reason, runtime=predictor.runtime, runtime_reason=predictor.runtime_reason,
                vocabulary=list(meta.vocabulary),
                prompt_templates=meta.prompt_templates, inference_defaults=predictor.default_params.to_dict(),
                limits=settings.limits(), batching=settings.batching(), auth=settings.api_key is not None)


@router.get("/metrics", response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {CONTENT_TYPE: {}}}})
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE)
