"""Pure-ASGI middlewares: the request-body size limit, the multipart check of upload routes, the per-request metrics.

Pure ASGI (not ``BaseHTTPMiddleware``) so that bodies stream through untouched and the limit is enforced while
the body is read, not after an unbounded body has been buffered.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BODY_LIMIT_SCOPE_KEY, PROTOCOL_STATUS_SCOPE_KEY, error_response
from service.metrics import Metrics


class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Answer 413 when a request body exceeds ``max_bytes``: at once from ``Content-Length``, else while counting
    the bytes as they arrive (chunked uploads). ``on_reject(reason)`` is called once per refusal."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_reject: Callable[[str], None]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await self._refuse(scope, receive, send, "malformed_request", "the Content-Length header is not a "
                                   "number")
                return
            if length > self.max_bytes:
                await self._refuse_too_large(scope, receive, send)
                return

        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    scope[BODY_LIMIT_SCOPE_KEY] = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's own answer to the interrupted body is replaced by ours
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if exceeded and not started:
            await self._refuse_too_large(scope, receive, send)

    async def _refuse_too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._refuse(scope, receive, send, "body_too_large",
                           f"the request body is larger than the limit of {self.max_bytes:,} bytes")

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, reason: str, message: str) -> None:
        self.on_reject(reason)
        await error_response(reason, message, {"Connection": "close"})(scope, receive, send)


def upload_paths(openapi: dict[str, Any]) -> frozenset[str]:
    """The paths whose POST operation takes a multipart/form-data body, from the app's OpenAPI document."""
    paths = openapi.get("paths", {})
    return frozenset(path for path, operations in paths.items()
                     if "multipart/form-data" in operations.get("post", {}).get("requestBody", {}).get("content", {}))


FORM_MEDIA_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded", "application/json")


class RequireMultipart:
    """Answer 400 at once, before reading the body, when a request to an upload route is neither a form nor JSON
    (it would otherwise be parsed as an empty form and answered "image: field required"). A url-encoded form
    passes (it is answered 422, naming the missing file). ``on_reject("malformed_request")`` counts it."""

    def __init__(self, app: ASGIApp, paths: frozenset[str], on_reject: Callable[[str], None]) -> None:
        self.app = app
        self.paths = paths
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        content_type = Headers(scope=scope).get("content-type", "")
        media_type = content_type.partition(";")[0].strip().lower()
        if media_type in FORM_MEDIA_TYPES:
            await self.app(scope, receive, send)
            return
        self.on_reject("malformed_request")
        got = f"Content-Type {media_type!r}" if media_type else "no Content-Type"
        message = (f"POST {scope['path']} takes a multipart/form-data body (an 'image' file and 'concepts' fields, "
                   f"as curl -F sends them) or an application/json body ({{\"image\": \"<base64>\", "
                   f"\"concepts\": [...]}}); the request has {got}")
        await error_response("malformed_request", message, {"Connection": "close"})(scope, receive, send)


class RequestMetrics:
    """Count every answer in ``zutis_requests_total{route,code}`` and time ``timed_routes`` in
    ``zutis_request_duration_seconds``. ``route`` is the path template of the matched route (the router records it
    in the scope), ``unmatched`` when none matched, so the label's values are bounded."""

    def __init__(self, app: ASGIApp, metrics: Metrics,
                 timed_routes: frozenset[str] = frozenset({"/segment"})) -> None:
        self.app = app
        self.metrics = metrics
        self.timed_routes = timed_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets when the app raises before answering

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            status = scope.get(PROTOCOL_STATUS_SCOPE_KEY, status)  # answered by the HTTP layer instead (408)
            route = getattr(scope.get("route"), "path", None)
            if route is None:  # refused before routing (413 on Content-Length) or no such route
                route = scope["path"] if scope["path"] in self.timed_routes else "unmatched"
            self.metrics.requests.labels(route=route, code=str(status)).inc()
            if route in self.timed_routes:
                self.metrics.request_duration.observe(time.perf_counter() - start)
