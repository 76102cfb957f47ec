"""One domain error type, mapped to an HTTP status and one JSON body shape in one place.

Every error answer of the service is ``{"error": "<human sentence>", "type": "<machine code>"}``, whether it
comes from a ``ServiceError`` raised inside, from FastAPI's own request validation, from routing (404/405) or
from an unexpected exception (500, details only in the log).

Status policy: 400 a request that cannot be parsed or an image that cannot be decoded; 401 a missing or wrong
API key; 404/405 routing; 408 a request head or body that did not arrive in time (answered by service.protocol,
before the app, in the same shape, then the connection is closed); 413 a body or an image over the limits; 415
an upload that is not an image in a supported format; 422 a missing field or a bad parameter value (FastAPI's
convention, used for all of them); 431 a request line plus headers over the limit (answered by service.protocol,
before the app, in the same shape); 499 the client went away (logged and counted, nobody reads it); 503 not
ready, draining or overloaded (the queue, or open connections: the latter answered by service.protocol), with
``Retry-After``; 504 the request's deadline passed.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

log = logging.getLogger("service")

# The machine codes, each with its one status. ``zutis_requests_rejected_total{reason}`` uses the same codes.
ERROR_STATUS: dict[str, int] = {
    "malformed_request": 400,
    "invalid_image": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "body_too_large": 413,
    "image_too_large": 413,
    "request_timeout": 408,
    "unsupported_media_type": 415,
    "headers_too_large": 431,
    "invalid_request": 422,
    "client_disconnected": 499,
    "internal_error": 500,
    "not_ready": 503,
    "draining": 503,
    "queue_full": 503,
    "too_many_connections": 503,
    "deadline_exceeded": 504,
}


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: str = Field(description="what went wrong, as a sentence")
    type: str = Field(description="machine-readable code, e.g. queue_full, invalid_request, body_too_large")


class ServiceError(Exception):
    """A request the service answers with an error: ``type`` is a key of ``ERROR_STATUS``."""

    def __init__(self, type: str, message: str, headers: dict[str, str] | None = None) -> None:
        if type not in ERROR_STATUS:
            raise KeyError(f"unknown error type {type!r}")
        super().__init__(message)
        self.type = type
        self.message = message
        self.headers = headers or {}

    @property
    def status_code(self) -> int:
        return ERROR_STATUS[self.type]


def error_response(type: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON answer for error ``type``."""
    return JSONResponse(ErrorBody(error=message, type=type).model_dump(), status_code=ERROR_STATUS[type],
                        headers=headers)


def describe_validation_error(exc: RequestValidationError) -> str:
    """FastAPI's validation errors as one sentence, e.g. "image: field required; nms_iou: not a number"."""
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "header", "path")]
        where = ".".join(loc) or "request"
        msg = "field required" if err.get("type") == "missing" else str(err.get("msg", "invalid value"))
        parts.append(f"{where}: {msg}")
    return "invalid request: " + "; ".join(parts) if parts else "invalid request"


# Set in the request scope by the body-size middleware: the app's own error about the cut body is not counted.
BODY_LIMIT_SCOPE_KEY = "zutis.body_limit_exceeded"
# Set in the request scope by service.protocol when it answered the request itself (408 while the app waited for
# the body): the status the client got, which the request metrics count instead of the app's unsent answer.
PROTOCOL_STATUS_SCOPE_KEY = "zutis.protocol_status"


def _count_rejection(request: Request, type: str) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None and not request.scope.get(BODY_LIMIT_SCOPE_KEY):
        metrics.count_rejection(type)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    _count_rejection(request, exc.type)
    return error_response(exc.type, exc.message, exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    _count_rejection(request, "invalid_request")
    return error_response("invalid_request", describe_validation_error(exc))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers: dict[str, Any] | None = getattr(exc, "headers", None)
    if exc.status_code == 404:
        return error_response("not_found", f"no such endpoint: {request.method} {request.url.path}", headers)
    if exc.status_code == 405:
        return error_response("method_not_allowed",
                              f"{request.method} is not allowed on {request.url.path}", headers)
    if exc.status_code == 400:
        _count_rejection(request, "malformed_request")
        return error_response("malformed_request", f"the request body could not be parsed ({exc.detail})", headers)
    code = {401: "unauthorized", 413: "body_too_large", 415: "unsupported_media_type", 422: "invalid_request",
            503: "not_ready"}.get(exc.status_code)
    if code is None:
        log.error("unmapped HTTP error %s: %s", exc.status_code, exc.detail)
        return JSONResponse(ErrorBody(error=str(exc.detail), type="http_error").model_dump(),
                            status_code=exc.status_code, headers=headers)
    return error_response(code, str(exc.detail), headers)


async def _client_disconnect(request: Request, exc: Exception) -> JSONResponse:
    """The client went away while its body was being read, or ``service.protocol`` answered 408 and closed the
    connection: nobody reads this answer; it is counted (as the 408 the client got, when it got one), not logged as
    a failure."""
    assert isinstance(exc, ClientDisconnect)
    _count_rejection(request, "client_disconnected")  # not when service.protocol answered (it counts its 408)
    return error_response("client_disconnected", "the client closed the connection while sending the request")


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response("internal_error", "internal error; the details are in the service log")


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through the one body shape."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
    app.add_exception_handler(Exception, _unexpected_error)
