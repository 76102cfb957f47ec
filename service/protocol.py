"""The HTTP/1.1 protocol the service runs under uvicorn: httptools, with a limit on the request head.

uvicorn's httptools protocol has no limit on the request line and headers: the parser hands a long header over in
pieces and both httptools and uvicorn join them with ``bytes +=`` on the event loop, which is quadratic. One 64 MB
header line took seconds to answer and stalled every other request (``/healthz`` included) meanwhile. uvicorn's
h11 protocol does bound the head (``h11_max_incomplete_event_size``, 16 KiB by default) but answers a too-large
head with a plain-text 400, and parses every request in pure Python (slower for everybody).

``bounded_head_protocol`` keeps httptools and feeds it at most ``max_head_bytes`` of a request's head: once that
many bytes have arrived without the end of the headers, the client gets 431 (with the service's JSON error body)
and the connection is closed, having cost at most that much parsing. What the client still sends meanwhile is
read and dropped, up to ``LINGER_BYTES`` or ``LINGER_S`` (so that a client slightly over the limit reads the
answer rather than a connection reset), then the connection closes regardless. Protocol errors answered here never reach the app or its middlewares.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

LINGER_S = 2.0  # how long a refused client may go on sending before the connection closes
LINGER_BYTES = 256 << 10  # and how much


def _head_too_large(limit: int) -> bytes:
    body = json.dumps({"error": f"the request line and headers are larger than the limit of {limit:,} bytes",
                       "type": "headers_too_large"}).encode()
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a limit on each request's head (request line + headers + blank line).

    Build a configured subclass with ``bounded_head_protocol``. The count starts at the first byte of a request
    and stops at the end of its headers. After a pipelined request, the rest of the read that held its end is
    parsed uncounted, so a head may overrun the limit by at most one read (256 KiB) in that case.
    """

    max_head_bytes: ClassVar[int] = 64 * 1024
    on_reject: ClassVar[Callable[[str], None] | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True
        self._refused = False
        self._dropped = 0

    def data_received(self, data: bytes) -> None:
        if self._refused:  # what a refused client still sends is dropped unparsed, up to a point
            self._dropped += len(data)
            if self._dropped > LINGER_BYTES:
                self.transport.close()
            return
        while data:
            if not self._in_head:
                super().data_received(data)
                return
            room = self.max_head_bytes - self._head_bytes
            piece, data = data[:room], data[room:]
            self._head_bytes += len(piece)
            super().data_received(piece)
            if self.parser is None or self.transport.is_closing():
                return
            if self._in_head and self._head_bytes >= self.max_head_bytes:
                self._refuse()
                return

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    def _refuse(self) -> None:
        self._refused = True
        if self.on_reject is not None:
            self.on_reject("headers_too_large")
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a pipelined head while an answer is being written: no room for ours
            return
        self.transport.write(_head_too_large(self.max_head_bytes))
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the answer, then our end of the connection
            asyncio.get_running_loop().call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()


def bounded_head_protocol(max_head_bytes: int,
                          on_reject: Callable[[str], None] | None = None) -> type[BoundedHeadProtocol]:
    """A ``BoundedHeadProtocol`` class for ``uvicorn.Config(http=...)`` with this limit (bytes) and a callback
    called with ``"headers_too_large"`` for each refusal (metrics)."""
    if max_head_bytes < 1:
        raise ValueError(f"max_head_bytes must be positive, got {max_head_bytes}")
    return type("BoundedHeadProtocol", (BoundedHeadProtocol,),
                {"max_head_bytes": max_head_bytes, "on_reject": staticmethod(on_reject) if on_reject else None})
