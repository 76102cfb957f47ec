"""The optional API key (``ZUTIS_API_KEY``): ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

It guards ``POST /segment`` and ``GET /info``. ``/healthz``, ``/readyz`` (probes), ``/metrics`` (Prometheus) and
the OpenAPI pages and the demo page (``/``, ``/demo/*``; its users type the key into it) stay open: keep
``/metrics`` off the public network (deploy/nginx hides it).

The key is checked by ``ApiKeyGate``, a pure-ASGI middleware, *before* any of the body is read or parsed: FastAPI
parses a form body before it runs a route's dependencies, so a dependency alone would parse a stranger's 32 MiB
upload first. The ``ApiKey`` dependency stays on the guarded routes so that the OpenAPI page shows the security
schemes (and checks again, which costs nothing); ``ApiKeyGate`` guards exactly the routes that declare it.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated, Any, Callable

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ServiceError, error_response

_bearer = HTTPBearer(auto_error=False, description="the API key as a bearer token")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}
DISCARD_BYTES = 1 << 20  # a refused request's declared body up to this size is read and dropped, unparsed ...
DISCARD_S = 2.0  # ... within this time, so that its client can read the 401 instead of a reset connection


def check_api_key(authorization: str | None, x_api_key: str | None, expected: SecretStr | None) -> None:
    """Pass when no key is configured, or when ``X-API-Key`` or ``Authorization: Bearer`` carries it
    (constant-time comparison). Raises ``ServiceError("unauthorized")`` otherwise, saying what is wrong."""
    if expected is None:
        return
    given = x_api_key
    if given is None and authorization is not None:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            hint = ("has no scheme" if not credentials.strip() and scheme.lower() != "bearer"
                    else f"uses the scheme {scheme!r}" if scheme.lower() != "bearer" else "has no key after Bearer")
            raise ServiceError("unauthorized", f"the Authorization header {hint}: send 'Authorization: Bearer <key>' "
                               "or 'X-API-Key: <key>'", _CHALLENGE)
        given = credentials.strip()
    if given is None:
        raise ServiceError("unauthorized", "an API key is required: send 'Authorization: Bearer <key>' or "
                           "'X-API-Key: <key>'", _CHALLENGE)
    if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise ServiceError("unauthorized", "the API key is not valid", _CHALLENGE)


def require_api_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_header)],
) -> None:
    """The route-level declaration of the key (for OpenAPI); the same check as ``ApiKeyGate``."""
    check_api_key(request.headers.get("authorization"), request.headers.get("x-api-key"),
                  request.app.state.settings.api_key)


ApiKey = Annotated[None, Depends(require_api_key)]


def guarded_paths(openapi: dict[str, Any]) -> frozenset[str]:
    """The paths whose operations declare a security requirement in the app's OpenAPI document (the routes that
    take ``ApiKey``). Read from the document, the public description of the routes, whatever the router's
    internals; paths with parameters are not supported (the service has none)."""
    return frozenset(path for path, operations in openapi.get("paths", {}).items()
                     if any(isinstance(op, dict) and op.get("security") for op in operations.values()))


class ApiKeyGate:
    """Refuse a request to a guarded path with 401 before its body is read; ``on_reject("unauthorized")`` counts
    it. The key is judged on the headers alone. A refused request whose ``Content-Length`` declares at most
    ``DISCARD_BYTES`` then has its body read and dropped, unparsed, for at most ``DISCARD_S`` (a client that is
    still sending when the server closes sees a reset connection, not the 401); any other refused request with a
    body gets ``Connection: close`` and its body is never read."""

    def __init__(self, app: ASGIApp, api_key: SecretStr | None, paths: frozenset[str],
                 on_reject: Callable[[str], None]) -> None:
        self.app = app
        self.api_key = api_key
        self.paths = paths
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.api_key is None or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            check_api_key(headers.get("authorization"), headers.get("x-api-key"), self.api_key)
        except ServiceError as error:
            self.on_reject(error.type)
            extra = dict(error.headers)
            if ("content-length" in headers or "transfer-encoding" in headers) and not await _discard_small_body(
                    headers, receive):
                extra["Connection"] = "close"
            await error_response(error.type, error.message, extra)(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _discard_small_body(headers: Headers, receive: Receive) -> bool:
    """Read and drop a body whose ``Content-Length`` is at most ``DISCARD_BYTES`` (never a chunked one), within
    ``DISCARD_S``; True when the whole body was consumed, so that the connection can stay open."""
    length = headers.get("content-length", "")
    if "transfer-encoding" in headers or not length.isdigit() or int(length) > DISCARD_BYTES:
        return False

    async def drain() -> bool:
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return False
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return True
            if seen > DISCARD_BYTES:
                return False

    try:
        return await asyncio.wait_for(drain(), DISCARD_S)
    except asyncio.TimeoutError:
        return False
