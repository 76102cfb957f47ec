"""The demo page: ``GET /`` serves a small browser client of ``POST /segment``; its assets are under ``/demo/``.

The page and its assets ship inside the package (``service/static``, package data), so it works on an offline
host: nothing is loaded from a CDN. It needs no API key to load; the key, when the service has one, is typed into
the page and sent by the browser as the ``X-API-Key`` header of each ``/segment`` request. The server never sees
it outside that request and never stores it.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
ASSET_PREFIX = "/demo"


async def demo_page() -> FileResponse:
    """The demo page (HTML); its script and style sheet come from ``/demo/``."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                        headers={"Cache-Control": "no-cache"})


def install_demo(app: FastAPI) -> None:
    """Serve the page at ``GET /`` and its assets at ``/demo/<file>`` (kept out of the OpenAPI schema)."""
    app.add_api_route("/", demo_page, methods=["GET"], include_in_schema=False, response_class=FileResponse)
    app.mount(ASSET_PREFIX, StaticFiles(directory=STATIC_DIR), name="demo")
