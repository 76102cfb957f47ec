"""The app factory: settings read once, a lifespan that starts and drains the engine, routes, errors, metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Callable

import anyio
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from model.checkpoint import read_metadata
from model.predictor import Predictor
from model.zoo import ZooModel
from service.auth import ApiKeyGate, guarded_paths
from service.docs import install_docs
from service.engine import Engine, EngineConfig
from service.errors import install_error_handlers
from service.metrics import Metrics
from service.middleware import BodySizeLimit, RequestMetrics, RequireMultipart, upload_paths
from service.model_source import checkpoint_loader, resolve_zoo_model, zoo_loader
from service.routes import ops, segment
from service.routes.demo import install_demo
from service.settings import Settings
from service.version import VERSION

log = logging.getLogger("service")

DESCRIPTION = """Zero-shot, open-vocabulary instance and semantic segmentation (ZUTIS).

`POST /segment` takes an image and any list of concepts. Errors are `{"error": "...", "type": "..."}`.
`/healthz`, `/readyz` and `/metrics` need no API key; `/segment` and `/info` do when `ZUTIS_API_KEY` is set.

Try it in the browser: [the demo page](/) draws the answer over your image."""


def check_checkpoint(settings: Settings) -> ZooModel | None:
    """Fail fast, naming the file, when the checkpoint is missing or not ours (reads the header only); for
    ``zoo:NAME``, when the zoo has no such model (the entry is returned: it is fetched once the lifespan starts)."""
    zoo = resolve_zoo_model(settings)
    if zoo is not None:
        return zoo
    path = settings.checkpoint
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path.resolve()} (set ZUTIS_CHECKPOINT to a "
                                f"checkpoint in our format, e.g. one written by model.checkpoint.save_checkpoint)")
    read_metadata(path)
    return None


def engine_config(settings: Settings) -> EngineConfig:
    """The engine's part of the settings."""
    return EngineConfig(max_batch_size=settings.max_batch_size, max_batch_delay_s=settings.max_batch_delay_ms / 1000.0,
                        queue_size=settings.queue_size, workers=settings.workers(),
                        text_cache_size=settings.text_cache_size, max_batch_padding=settings.max_batch_padding,
                        retry_after_s=settings.retry_after_s, flush_denormal=settings.flush_denormal,
                        torch_threads=settings.torch_threads, max_image_pixels=settings.max_image_pixels,
                        exif_orientation=settings.exif_orientation, max_instances=settings.max_instances)


def create_app(settings: Settings | None = None, *, loader: Callable[[], Predictor] | None = None,
               on_fatal: Callable[[BaseException], None] | None = None) -> FastAPI:
    """Build the service.

    Args:
        settings: the configuration; default ``Settings()`` (reads ``ZUTIS_*`` from the environment, here only).
        loader: builds the ``Predictor`` in the engine thread; default ``Predictor.from_checkpoint`` with the
            settings' checkpoint, device, dtype and input size, after fetching it for ``zoo:NAME``
            (service.model_source); tests pass slower or instrumented loaders.
        on_fatal: called (from the engine thread) when the model fails to load or warm up.

    The model loads and warms up in the background once the lifespan starts: ``/healthz`` answers at once,
    ``/readyz`` turns 200 when warm-up is done.
    """
    settings = settings if settings is not None else Settings()
    zoo = check_checkpoint(settings)
    metrics = Metrics()
    if loader is None and zoo is not None:
        loader = zoo_loader(settings, zoo)
    if loader is None:
        loader = checkpoint_loader(settings, settings.checkpoint)
    lifespan = partial(_run_engine, settings, metrics, _reporting_build_info(loader, metrics), on_fatal)
    app = FastAPI(title="zutis-service", version=VERSION, description=DESCRIPTION, lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    install_docs(app)  # /docs with Swagger UI's files served here, not from a CDN
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(ops.router)
    app.include_router(segment.router)
    install_demo(app)
    _install_middleware(app, settings, metrics)  # after the routes: it reads which routes need what
    return app


def _reporting_build_info(loader: Callable[[], Predictor], metrics: Metrics) -> Callable[[], Predictor]:
    """``loader`` that also sets ``zutis_build_info`` from what it loaded."""
    def loaded() -> Predictor:
        predictor = loader()
        metrics.set_build_info(VERSION, predictor.model_id, str(predictor.device),
                               str(predictor.dtype).removeprefix("torch."))
        return predictor

    return loaded


@asynccontextmanager
async def _run_engine(settings: Settings, metrics: Metrics, loader: Callable[[], Predictor],
                      on_fatal: Callable[[BaseException], None] | None, app: FastAPI) -> AsyncIterator[None]:
    """The lifespan: start the engine (it loads in the background), and drain it at shutdown."""
    engine = Engine(loader, engine_config(settings), metrics, on_fatal)
    app.state.engine = engine
    engine.start()
    try:
        yield
    finally:
        # service.server sets shutdown_deadline (time.monotonic()) when a signal started the drain.
        deadline = getattr(app.state, "shutdown_deadline", None)
        timeout = settings.drain_timeout_s if deadline is None else max(0.0, deadline - time.monotonic())
        log.info("draining: waiting for %d request(s)", engine.admitted)
        await anyio.to_thread.run_sync(engine.stop, timeout)
        log.info("stopped")


def _install_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """The middleware stack, innermost first: nothing below reads a body before the key and the content type are
    checked. Which routes need the key or take uploads is read from the routes' OpenAPI description (so: add
    routes before this); get_openapi, unlike app.openapi(), caches nothing."""
    openapi = get_openapi(title=app.title, version=app.version, routes=app.routes)
    app.add_middleware(RequireMultipart, paths=upload_paths(openapi), on_reject=metrics.count_rejection)
    app.add_middleware(ApiKeyGate, api_key=settings.api_key, paths=guarded_paths(openapi),
                       on_reject=metrics.count_rejection)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, on_reject=metrics.count_rejection)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: sees the 413s too
