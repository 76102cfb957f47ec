"""The demo page: ``GET /`` serves a small browser client of ``POST /segment``; its assets are under ``/demo/``.

The page and its assets ship inside the package (``service/static``, package data), so it works on an offline
host: nothing is loaded from a CDN. It needs no API key to load; the key, when the service has one, is typed into
the page and sent by the browser as the ``X-API-Key`` header of each ``/segment`` request. The server never sees
it outside that request and never stores it.

The page's threshold sliders start at the checkpoint's own defaults: written into the page when the model is
loaded, and otherwise read by its script from ``/demo/defaults.json`` (public like the page: two numbers of the
model's post-processing, nothing else) once the service is ready.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from service.dependencies import EngineDep, SettingsDep
from service.errors import ServiceError

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
ASSET_PREFIX = "/demo"


async def demo_page(request: Request) -> HTMLResponse:
    """The demo page (HTML), its sliders at the checkpoint's defaults once the model is loaded; its script and
    style sheet come from ``/demo/``."""
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    engine = getattr(request.app.state, "engine", None)
    predictor = getattr(engine, "predictor", None)
    if predictor is not None:
        params = predictor.default_params
        html = with_slider_defaults(html, {"score-threshold": float(params.score_threshold),
                                           "mask-threshold": float(params.mask_threshold)})
    return HTMLResponse(html, headers={"Cache-Control": "no-cache"})


def with_slider_defaults(html: str, defaults: dict[str, float]) -> str:
    """``html`` with each slider (by element id) enabled at its default value and labelled "model default (x)"."""
    for slider, value in defaults.items():
        html = re.sub(rf'(<input id="{slider}"[^>]*?) disabled>', rf'\g<1> value="{value:g}">', html)
        html = re.sub(rf'(<output id="{slider}-value"[^>]*>)[^<]*(</output>)',
                      rf"\g<1>model default ({value:.2f})\g<2>", html)
    return html


async def demo_defaults(engine: EngineDep, settings: SettingsDep) -> dict[str, float]:
    """The checkpoint's default score and mask thresholds, where the page's sliders start."""
    predictor = engine.predictor
    if predictor is None:
        raise ServiceError("not_ready", f"the model is not loaded yet ({engine.state.value})",
                           {"Retry-After": str(settings.retry_after_s)})
    params = predictor.default_params
    return {"score_threshold": float(params.score_threshold), "mask_threshold": float(params.mask_threshold)}


def install_demo(app: FastAPI) -> None:
    """Serve the page at ``GET /``, the sliders' starting values at ``/demo/defaults.json`` and the assets at
    ``/demo/<file>`` (all kept out of the OpenAPI schema)."""
    app.add_api_route("/", demo_page, methods=["GET"], include_in_schema=False, response_class=HTMLResponse)
    app.add_api_route(f"{ASSET_PREFIX}/defaults.json", demo_defaults, methods=["GET"], include_in_schema=False)
    app.mount(ASSET_PREFIX, StaticFiles(directory=STATIC_DIR), name="demo")
