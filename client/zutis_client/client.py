"""``Client`` and ``AsyncClient``: ``segment(image, concepts, **params) -> SegmentResult`` over HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, Literal

import httpx

from zutis_client.errors import ZutisError, ZutisUsageError
from zutis_client.result import SegmentResult
from zutis_client.retry import RetryPolicy, check_answer, transport_error
from zutis_client.upload import ImageInput, to_base64, to_upload

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 60.0
Semantic = Literal["png", "rle", "none"]
MaskFormat = Literal["rle", "polygon"]
Vocabulary = Literal["coco", "coca", "imagenet_s919", "checkpoint"]
Send = Literal["multipart", "json"]


def segment_fields(concepts: str | Sequence[str] | None = None, vocabulary: Vocabulary | None = None,
                   **params: Any) -> dict[str, Any]:
    """The request's fields of ``POST /segment`` (everything but the image), typed as a JSON body has them;
    parameters left None are not sent (the service's defaults apply). ``concepts``: one comma-separated string
    or a list of names (each name may itself hold commas, which the service splits on); or ``vocabulary``, a
    named vocabulary instead (coco, coca, imagenet_s919, checkpoint)."""
    if (concepts is None) == (vocabulary is None):
        raise ZutisUsageError("invalid_argument", "pass concepts or a vocabulary name (one of them)")
    fields: dict[str, Any] = {}
    if concepts is not None:
        names = [concepts] if isinstance(concepts, str) else [str(c) for c in concepts]
        if not any(name.strip(" ,") for name in names):
            raise ZutisUsageError("invalid_argument", "no concepts given: pass at least one concept name")
        fields["concepts"] = names
    else:
        fields["vocabulary"] = vocabulary
    fields.update({name: value for name, value in params.items() if value is not None})
    return fields


def segment_request(image: ImageInput, fields: dict[str, Any], send: Send) -> dict[str, Any]:
    """The httpx arguments of ``POST /segment``: a multipart form (the image as a file) or a JSON body (the image
    base64-encoded; the service's body limit then counts the encoded body, about 4/3 of the file)."""
    if send == "json":
        return {"json": {"image": to_base64(image), **fields}}
    if send != "multipart":
        raise ZutisUsageError("invalid_argument", f"send must be 'multipart' or 'json', got {send!r}")
    form = {name: value if name == "concepts" else str(value) for name, value in fields.items()}
    return {"data": form, "files": {"image": to_upload(image)}}


def _headers(api_key: str | None) -> dict[str, str]:
    return {"X-API-Key": api_key} if api_key else {}


class Client:
    """A synchronous client of one zutis-service (thread-safe: one connection pool, shareable by threads).

    Args:
        url: the service's base URL.
        api_key: sent as ``X-API-Key`` when given.
        timeout_s: per-request timeout in seconds (connect, read, write and pool each).
        retry: retries of 503 answers (not ready, draining, queue full), honouring ``Retry-After`` up to
            ``retry.max_wait_s`` per wait.
        transport: an httpx transport (tests, proxies); default httpx's.

    Every failure raises ``ZutisError``.
    """

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 retry: RetryPolicy | None = None, transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(base_url=self.url, headers=_headers(api_key), timeout=timeout_s,
                                  transport=transport)

    def segment(self, image: ImageInput, concepts: str | Sequence[str] | None = None, *,
                vocabulary: Vocabulary | None = None, score_threshold: float | None = None,
                mask_threshold: float | None = None, nms_iou: float | None = None,
                max_instances: int | None = None, semantic: Semantic = "png", mask_format: MaskFormat = "rle",
                polygon_tolerance: float | None = None, send: Send = "multipart") -> SegmentResult:
        """Instances and the semantic map of ``image`` for ``concepts`` (or a named ``vocabulary``); parameters
        left None take the service's defaults. ``mask_format="polygon"`` asks for COCO polygons (each
        instance's ``mask`` decodes either format); ``send="json"`` sends a JSON body with the image in base64
        instead of a multipart form. See ``POST /segment`` in the service's README for the parameters."""
        fields = segment_fields(concepts, vocabulary, score_threshold=score_threshold,
                                mask_threshold=mask_threshold, nms_iou=nms_iou, max_instances=max_instances,
                                semantic=semantic, mask_format=mask_format, polygon_tolerance=polygon_tolerance)
        return SegmentResult.from_json(self._request("POST", "/segment", **segment_request(image, fields, send)))

    def info(self) -> dict[str, Any]:
        """``GET /info``: model, limits and batching."""
        return self._request("GET", "/info")

    def ready(self) -> bool:
        """Whether ``GET /readyz`` answers 200 now (no retries)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise transport_error(exc, self.url + path) from exc
            delay = self.retry.delay_s(response, attempt)
            if delay is None:
                return check_answer(response)
            time.sleep(delay)
            attempt += 1

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of ``Client`` (same arguments and methods, awaited)."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 retry: RetryPolicy | None = None, transport: httpx.AsyncBaseTransport | None = None,
                 max_connections: int = 100) -> None:
        self.url = url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(base_url=self.url, headers=_headers(api_key), timeout=timeout_s,
                                       transport=transport,
                                       limits=httpx.Limits(max_connections=max_connections))

    async def segment(self, image: ImageInput, concepts: str | Sequence[str] | None = None, *,
                      vocabulary: Vocabulary | None = None, score_threshold: float | None = None,
                      mask_threshold: float | None = None, nms_iou: float | None = None,
                      max_instances: int | None = None, semantic: Semantic = "png", mask_format: MaskFormat = "rle",
                      polygon_tolerance: float | None = None, send: Send = "multipart") -> SegmentResult:
        """See ``Client.segment``."""
        fields = segment_fields(concepts, vocabulary, score_threshold=score_threshold,
                                mask_threshold=mask_threshold, nms_iou=nms_iou, max_instances=max_instances,
                                semantic=semantic, mask_format=mask_format, polygon_tolerance=polygon_tolerance)
        return SegmentResult.from_json(await self._request("POST", "/segment",
                                                           **segment_request(image, fields, send)))

    async def info(self) -> dict[str, Any]:
        return await self._request("GET", "/info")

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise transport_error(exc, self.url + path) from exc
            delay = self.retry.delay_s(response, attempt)
            if delay is None:
                return check_answer(response)
            await asyncio.sleep(delay)
            attempt += 1

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


__all__ = ["AsyncClient", "Client", "DEFAULT_URL", "ZutisError"]
