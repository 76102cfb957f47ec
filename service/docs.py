"""``/docs``: the OpenAPI page (Swagger UI), with its JavaScript and CSS served by the service itself.

FastAPI's own ``/docs`` loads Swagger UI from a CDN, so it is blank on a host without internet access. The files
come from the ``swagger-ui-bundle-v2`` package (Swagger UI 5, which reads FastAPI's OpenAPI 3.1; Apache-2.0) and
are served under ``/docs/assets``. ``/redoc`` (CDN only) is not offered.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"


def install_docs(app: FastAPI) -> None:
    """Add ``/docs``, ``/docs/oauth2-redirect`` and the Swagger UI files under ``/docs/assets`` to ``app`` (built
    with ``docs_url=None, redoc_url=None``)."""
    oauth2_redirect = f"{DOCS_PATH}/oauth2-redirect"

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - API",
                                   swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon-32x32.png",
                                   oauth2_redirect_url=f"{root}{oauth2_redirect}")

    async def swagger_ui_redirect(request: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    app.add_route(DOCS_PATH, swagger_ui, include_in_schema=False)
    app.add_route(oauth2_redirect, swagger_ui_redirect, include_in_schema=False)
    app.mount(ASSETS_PATH, StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui")
