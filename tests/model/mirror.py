"""A local mirror for the download tests: an HTTP server on 127.0.0.1 (``http.server`` in a thread) serving files
the tests make, with the failures a real host shows switchable per path.

``Mirror.files[path] = bytes`` publishes a file; ``Mirror.behaviour[path]`` (a ``Behaviour``) makes it misbehave:
no Range support (the whole file, 200, for a range request), a connection dropped after N bytes for the first K
requests, a body always cut after N bytes (a truncated file: the full Content-Length announced), an HTML page
instead of the file, an HTTP status, a pause before the body (``gate``, an Event the test sets), a slow body.
Every request is logged (path, Range header, status).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HTML_PAGE = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Please log in</body></html>\n"


@dataclass
class Behaviour:
    ranges: bool = True
    drop_after: int | None = None  # bytes sent before the connection is closed...
    drops: int = 0  # ...for this many requests
    truncate_to: int | None = None  # every response stops here while announcing the full length
    html: bool = False
    status: int | None = None
    gate: threading.Event | None = None  # the body waits for it
    seconds_per_chunk: float = 0.0
    gzip: bool = False  # compress the body (Content-Encoding: gzip) although the client asked for identity


@dataclass
class Request:
    path: str
    range: str | None
    status: int


@dataclass
class Mirror:
    base: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    behaviour: dict[str, Behaviour] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def requests_for(self, path: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == "/" + path.lstrip("/")]

    def full_downloads(self, path: str) -> int:
        """Requests for ``path`` that were answered with the whole file from byte 0."""
        return sum(1 for r in self.requests_for(path) if r.status == 200)


def _handler(mirror: Mirror) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            how = mirror.behaviour.get(path.lstrip("/"), Behaviour())
            data = mirror.files.get(path.lstrip("/"))
            status, body, headers = self._plan(how, data)
            with mirror.lock:
                mirror.requests.append(Request(path, self.headers.get("Range"), status))
                drop = how.drop_after if how.drops > 0 else None
                if drop is not None:
                    how.drops -= 1
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if how.gate is not None:
                how.gate.wait(30)
            limit = len(body)
            if drop is not None:
                limit = min(limit, drop)
            if how.truncate_to is not None and status in (200, 206):
                start = 0 if status == 200 else self._range_start(data)
                limit = min(limit, max(0, how.truncate_to - start))
            for offset in range(0, limit, 64 * 1024):
                self.wfile.write(body[offset:min(limit, offset + 64 * 1024)])
                if how.seconds_per_chunk:
                    time.sleep(how.seconds_per_chunk)
            self.wfile.flush()
            self.close_connection = True

        def _range_start(self, data: bytes | None) -> int:
            spec = self.headers.get("Range", "")
            return int(spec.removeprefix("bytes=").split("-", 1)[0]) if spec.startswith("bytes=") else 0

        def _plan(self, how: Behaviour, data: bytes | None) -> tuple[int, bytes, dict[str, str]]:
            if how.status is not None:
                page = f"error {how.status}\n".encode()
                return how.status, page, {"Content-Type": "text/plain", "Content-Length": str(len(page))}
            if data is None:
                return 404, b"not found\n", {"Content-Type": "text/plain", "Content-Length": "10"}
            if how.html:
                return 200, HTML_PAGE, {"Content-Type": "text/html; charset=utf-8",
                                        "Content-Length": str(len(HTML_PAGE))}
            if how.gzip:
                body = gzip.compress(data)
                return 200, body, {"Content-Type": "application/octet-stream", "Content-Encoding": "gzip",
                                   "Content-Length": str(len(body))}
            etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
            headers = {"Content-Type": "application/octet-stream", "ETag": etag}
            range_header = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if how.ranges and range_header and (if_range is None or if_range == etag):
                start = self._range_start(data)
                if start >= len(data):
                    return 416, b"", {"Content-Range": f"bytes */{len(data)}", "Content-Length": "0"}
                headers.update({"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}",
                                "Content-Length": str(len(data) - start)})
                return 206, data[start:], headers
            headers["Content-Length"] = str(len(data))
            if how.ranges:
                headers["Accept-Ranges"] = "bytes"
            return 200, data, headers

    return Handler


class MirrorServer:
    """``with MirrorServer() as mirror:`` a running mirror on a free loopback port, stopped at the end."""

    def __init__(self) -> None:
        self.mirror = Mirror()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.mirror))
        self._server.daemon_threads = True
        self.mirror.base = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="mirror", daemon=True)

    def __enter__(self) -> Mirror:
        self._thread.start()
        return self.mirror

    def __exit__(self, *exc: Any) -> None:
        for how in self.mirror.behaviour.values():
            if how.gate is not None:
                how.gate.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def write_manifest(path: Path, models: dict[str, dict[str, Any]]) -> Path:
    """A zoo manifest file with ``models`` (entries as in ``model/zoo.json``)."""
    path.write_text(json.dumps({"format": "zutis-zoo/1", "models": models}, indent=1), encoding="utf-8")
    return path


def publish_tiny_release(mirror: Mirror, release: dict[str, Any], name: str = "tiny-coco",
                         **overrides: Any) -> dict[str, Any]:
    """Publish a tiny official release (``tests.model.conftest.tiny_official_conversion``'s files) on ``mirror``
    under ``zoo/`` and return its manifest entry: the CLIP file's sha256 given, the ZUTIS file's null (as for the
    real releases), the tiny architecture inline. ``overrides`` replace entry fields."""
    from model.config import tiny_test_config

    zutis, clip = Path(release["zutis_path"]).read_bytes(), Path(release["clip_path"]).read_bytes()
    mirror.files["zoo/coco_vit_tiny.pt"] = zutis
    mirror.files["zoo/ViT-tiny.pt"] = clip
    entry = {"zutis": {"url": mirror.url("zoo/coco_vit_tiny.pt"), "sha256": None},
             "clip": {"url": mirror.url("zoo/ViT-tiny.pt"), "sha256": hashlib.sha256(clip).hexdigest()},
             "vocabulary": "coco", "architecture": tiny_test_config().to_dict(),
             "description": f"{name}: a random tiny release for tests"}
    entry.update(overrides)
    return entry
