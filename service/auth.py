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
    it. A refused request that declared a body gets ``Connection: close``: its body is never read."""

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
            if "content-length" in headers or "transfer-encoding" in headers:
                extra["Connection"] = "close"
            await error_response(error.type, error.message, extra)(scope, receive, send)
            return
        await self.app(scope, receive, send)
