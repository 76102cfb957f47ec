"""The client's one exception type."""

from __future__ import annotations


class ZutisError(Exception):
    """A request that did not give an answer.

    Attributes:
        type: the service's machine code (``invalid_request``, ``unauthorized``, ``queue_full``, ...) or, for
            failures before an answer, ``timeout``, ``connection_error`` or ``http_error`` (an answer that is not
            the service's JSON error body) or ``invalid_answer`` (a 200 answer that is not a segmentation answer:
            a field missing or malformed), or for failures found by the client itself (``ZutisUsageError``)
            ``invalid_argument``, ``unreadable_image`` or ``image_mismatch``.
        message: the service's sentence (or the transport's).
        status: the HTTP status, None when no answer came.
        retry_after_s: the answer's ``Retry-After`` in seconds, when it had one.
    """

    def __init__(self, type: str, message: str, status: int | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(f"{message} ({type}" + (f", HTTP {status})" if status is not None else ")"))
        self.type = type
        self.message = message
        self.status = status
        self.retry_after_s = retry_after_s


class ZutisUsageError(ZutisError, ValueError):
    """A failure found by the client itself, before or after the request, never a transport failure.

    ``type`` is ``invalid_argument`` (no concepts, an image of a kind the client cannot send),
    ``unreadable_image`` (a file that cannot be read or decoded locally) or ``image_mismatch`` (an overlay of an image
    that is not the one the answer describes). A ``ValueError`` too, as these failures were before they were
    ``ZutisError``s; ``status`` is None.
    """

    def __init__(self, type: str, message: str) -> None:
        super().__init__(type, message)
