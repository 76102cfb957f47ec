"""What to do with an answer: return it, wait and retry (503), or raise ``ZutisError``. Shared by the sync and
async clients, which differ only in how they send and sleep."""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass

import httpx

from zutis_client.errors import ZutisError, ZutisUsageError

RETRYABLE_STATUS = 503  # not ready, draining or queue full: the service says when to come back (Retry-After)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of 503 answers.

    Attributes:
        retries: extra attempts after the first (0: never retry).
        max_wait_s: the longest wait before one retry, whatever ``Retry-After`` asks for.
        backoff_s: the wait when a 503 has no ``Retry-After``, doubled at each retry (and capped by ``max_wait_s``).
    """

    retries: int = 3
    max_wait_s: float = 30.0
    backoff_s: float = 0.5

    def __post_init__(self) -> None:
        if self.retries < 0 or self.max_wait_s < 0 or self.backoff_s < 0:
            raise ZutisUsageError("invalid_argument", f"retries, max_wait_s and backoff_s must be >= 0: {self}")

    def delay_s(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying ``response`` (the answer to attempt ``attempt``, 0-based), or None when
        it is not to be retried."""
        if response.status_code != RETRYABLE_STATUS or attempt >= self.retries:
            return None
        asked = retry_after_s(response)
        wait = asked if asked is not None else self.backoff_s * 2 ** attempt
        return min(max(wait, 0.0), self.max_wait_s)


def retry_after_s(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def check_answer(response: httpx.Response) -> dict:
    """The JSON body of a 2xx answer; otherwise ``ZutisError`` with the service's ``type`` and message."""
    if response.is_success:
        try:
            return response.json()
        except ValueError:
            raise ZutisError("http_error", f"the answer is not JSON: {response.text[:200]!r}",
                             response.status_code) from None
    try:
        body = response.json()
        type_, message = str(body["type"]), str(body["error"])
    except (ValueError, KeyError, TypeError):
        type_, message = "http_error", (response.text[:300] or response.reason_phrase)
    raise ZutisError(type_, message, response.status_code, retry_after_s(response))


def transport_error(exc: httpx.TransportError, url: str) -> ZutisError:
    """A failure before any answer, as ``ZutisError`` (``timeout`` or ``connection_error``)."""
    if isinstance(exc, httpx.TimeoutException):
        return ZutisError("timeout", f"no answer from {url} in time ({type(exc).__name__})")
    return ZutisError("connection_error", f"could not reach {url}: {exc}")
