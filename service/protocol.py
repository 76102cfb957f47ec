"""The HTTP/1.1 protocol the service runs under uvicorn: httptools, with limits on the request head, on how long
a client may take to send a request, and on how many connections may be open.

uvicorn's httptools protocol has no limit on the request line and headers: the parser hands a long header over in
pieces and both httptools and uvicorn join them with ``bytes +=`` on the event loop, which is quadratic. One 64 MB
header line took seconds to answer and stalled every other request (``/healthz`` included) meanwhile. uvicorn's
h11 protocol does bound the head (``h11_max_incomplete_event_size``, 16 KiB by default) but answers a too-large
head with a plain-text 400, and parses every request in pure Python (slower for everybody).

``guarded_protocol`` keeps httptools and adds, per connection:

- a size limit on the head: at most ``max_head_bytes`` of a request's head reach the parser; once that many bytes
  have arrived without the end of the headers, the client gets 431 and the connection is closed, having cost at
  most that much parsing;
- deadlines: a head not complete ``head_timeout_s`` after the connection opened (or after the first byte of a later
  request on a kept-alive connection), a body that sends nothing for ``body_idle_timeout_s``, or a body not complete
  ``body_timeout_s`` after its headers, gets 408 and the connection is closed. uvicorn has none of these: a request
  declaring ``Content-Length: 50000`` and sending 100 bytes held its socket for good. Time during which the
  service itself is not reading (flow control: the app has not taken what arrived) does not count as idle;
- a cap on open connections (``max_connections``): the one over it is answered 503 at once and closed, instead of
  the process running out of file descriptors (where accept() fails and every client suffers).

Each answer has the service's JSON error body. After an answer sent from here, what the client still sends is read
and dropped, up to ``LINGER_BYTES`` or ``LINGER_S`` (so that a client that is still sending reads the answer rather
than a connection reset), then the connection closes regardless. Protocol refusals never reach the app's routes;
an app task waiting for the body of a timed-out request sees the client as gone.
"""

from __future__ import annotations

import asyncio
import http
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.errors import BODY_LIMIT_SCOPE_KEY, ERROR_STATUS, PROTOCOL_STATUS_SCOPE_KEY

if TYPE_CHECKING:
    from service.settings import Settings

LINGER_S = 2.0  # how long a refused client may go on sending before the connection closes
LINGER_BYTES = 256 << 10  # and how much


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may cost: head size (bytes), deadlines (seconds; None = none) and the connection cap."""

    max_head_bytes: int = 64 * 1024
    head_timeout_s: float | None = None
    body_idle_timeout_s: float | None = None
    body_timeout_s: float | None = None
    max_connections: int | None = None
    retry_after_s: int = 1

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(max_head_bytes=settings.max_header_bytes, head_timeout_s=settings.head_timeout_s,
                   body_idle_timeout_s=settings.body_idle_timeout_s, body_timeout_s=settings.body_timeout_s,
                   max_connections=settings.connection_limit(), retry_after_s=settings.retry_after_s)


def error_answer(type: str, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 answer with the service's JSON error body for error ``type``, ending the connection."""
    status = ERROR_STATUS[type]
    body = json.dumps({"error": message, "type": type}).encode()
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", "content-type: application/json",
             f"content-length: {len(body)}", "connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with this module's limits. Build a configured subclass with ``guarded_protocol``.

    The head count starts at the first byte of a request and stops at the end of its headers. After a pipelined
    request, the rest of the read that held its end is parsed uncounted, so a head may overrun the limit by at
    most one read (256 KiB) in that case.
    """

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    on_reject: ClassVar[Callable[[str], None] | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True
        self._refused = False
        self._dropped = 0
        self._head_started: float | None = None  # monotonic time the current head began, None between requests
        self._in_body = False  # headers complete, body not yet
        self._body_started = 0.0
        self._last_byte = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio protocol ----------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        cap = self.limits.max_connections
        if cap is not None and len(self.connections) > cap:
            self._refuse("too_many_connections", f"the service has the most open connections it accepts ({cap:,}); "
                         "retry later", {"retry-after": str(self.limits.retry_after_s)})
            return
        self._start_head_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:  # what a refused client still sends is dropped unparsed, up to a point
            self._dropped += len(data)
            if self._dropped > LINGER_BYTES:
                self.transport.close()
            return
        if self._in_body:
            self._last_byte = time.monotonic()
        elif self._in_head and self._head_started is None:
            self._start_head_clock()  # the first byte of a later request on a kept-alive connection
        self._feed(data)
        if self._in_body and self._timer is None and not self._refused:
            self._arm(self._body_deadline())

    # -- httptools callbacks -------------------------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_started = None
        self._cancel_timer()
        self._in_body = True
        self._body_started = self._last_byte = time.monotonic()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_body = False
        self._cancel_timer()
        self._in_head = True
        self._head_bytes = 0

    # -- the head's size -----------------------------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        while data:
            if not self._in_head:
                super().data_received(data)
                return
            room = self.limits.max_head_bytes - self._head_bytes
            piece, data = data[:room], data[room:]
            self._head_bytes += len(piece)
            super().data_received(piece)
            if self.parser is None or self.transport.is_closing():
                return
            if self._in_head and self._head_bytes >= self.limits.max_head_bytes:
                self._refuse("headers_too_large", "the request line and headers are larger than the limit of "
                             f"{self.limits.max_head_bytes:,} bytes")
                return

    # -- deadlines -----------------------------------------------------------------------------------------------
    def _start_head_clock(self) -> None:
        self._head_started = time.monotonic()
        if self.limits.head_timeout_s is not None:
            self._cancel_timer()
            self._arm(self._head_started + self.limits.head_timeout_s)

    def _body_deadline(self) -> float | None:
        """The earlier of the idle and the whole-body deadline (monotonic seconds), None when there is neither."""
        idle, whole = self.limits.body_idle_timeout_s, self.limits.body_timeout_s
        deadlines = [t for t in (None if idle is None else self._last_byte + idle,
                                 None if whole is None else self._body_started + whole) if t is not None]
        return min(deadlines) if deadlines else None

    def _arm(self, deadline: float | None) -> None:
        # One timer per connection, checked lazily when it fires: bytes arriving only move _last_byte.
        if deadline is not None:
            self._timer = self.loop.call_at(self.loop.time() + max(0.0, deadline - time.monotonic()), self._check)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self._refused or self.transport.is_closing():
            return
        now = time.monotonic()
        if self._in_head and self._head_started is not None and self.limits.head_timeout_s is not None:
            if self.cycle is not None and not self.cycle.response_complete:
                self._head_started = now  # a pipelined head: its clock starts once the answer before it is out
            if now >= self._head_started + self.limits.head_timeout_s:
                self._time_out("the request line and headers did not arrive within "
                               f"{self.limits.head_timeout_s:g} s")
            else:
                self._arm(self._head_started + self.limits.head_timeout_s)
        elif self._in_body:
            if self.flow.read_paused:
                self._last_byte = now  # the service is not reading: the client is not idle
            whole, idle = self.limits.body_timeout_s, self.limits.body_idle_timeout_s
            if whole is not None and now >= self._body_started + whole:
                self._time_out(f"the request body was not complete within {whole:g} s")
            elif idle is not None and now >= self._last_byte + idle:
                self._time_out(f"no byte of the request body arrived for {idle:g} s")
            else:
                self._arm(self._body_deadline())

    def _time_out(self, message: str) -> None:
        cycle = self.cycle
        if self._in_body and cycle is not None:
            cycle.scope[BODY_LIMIT_SCOPE_KEY] = True  # the app's own error about the cut body is not counted
            answered = cycle.response_started
            if not answered:
                cycle.scope[PROTOCOL_STATUS_SCOPE_KEY] = ERROR_STATUS["request_timeout"]
            cycle.disconnected = True  # the app's task sees the client as gone and writes nothing more
            cycle.message_event.set()
            if answered:
                self._count("request_timeout")
                self.transport.close()
                return
        self._refuse("request_timeout", message)

    # -- refusing ------------------------------------------------------------------------------------------------
    def _count(self, reason: str) -> None:
        if self.on_reject is not None:
            self.on_reject(reason)

    def _refuse(self, type: str, message: str, headers: dict[str, str] | None = None) -> None:
        self._refused = True
        self._cancel_timer()
        self._count(type)
        if self.cycle is not None and not self.cycle.response_complete and not self.cycle.disconnected:
            self.transport.close()  # a pipelined head while an answer is being written: no room for ours
            return
        self.transport.write(error_answer(type, message, headers))
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the answer, then our end of the connection
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()


def guarded_protocol(limits: ConnectionLimits,
                     on_reject: Callable[[str], None] | None = None) -> type[GuardedProtocol]:
    """A ``GuardedProtocol`` class for ``uvicorn.Config(http=...)`` with these limits and a callback called with
    the error type of each refusal (``headers_too_large``, ``request_timeout``, ``too_many_connections``; metrics)."""
    if limits.max_head_bytes < 1:
        raise ValueError(f"max_head_bytes must be positive, got {limits.max_head_bytes}")
    return type("GuardedProtocol", (GuardedProtocol,),
                {"limits": limits, "on_reject": staticmethod(on_reject) if on_reject else None})
