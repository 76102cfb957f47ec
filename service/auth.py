"""The optional API key (``ZUTIS_API_KEY``): ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

It guards ``POST /segment`` and ``GET /info``. ``/healthz``, ``/readyz`` (probes), ``/metrics`` (Prometheus) and
the OpenAPI pages and the demo page (``/``, ``/demo/*``; its users type the key into it) stay open: keep
``/metrics`` off the public network (deploy/nginx hides it).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.errors import ServiceError

_bearer = HTTPBearer(auto_error=False, description="the API key as a bearer token")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key")


def require_api_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_header)],
) -> None:
    """Pass when no key is configured, or when either header carries it (constant-time comparison)."""
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    given = header_key if header_key is not None else (bearer.credentials if bearer is not None else None)
    if given is None:
        raise ServiceError("unauthorized", "an API key is required: send 'Authorization: Bearer <key>' or "
                           "'X-API-Key: <key>'", {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise ServiceError("unauthorized", "the API key is not valid", {"WWW-Authenticate": "Bearer"})


ApiKey = Annotated[None, Depends(require_api_key)]
