"""Downloading one file into the cache so that it can be trusted: resumable, verified, atomic, locked.

``download(remote, dest)`` fetches ``remote.url`` (httpx) into ``dest``:

- into ``dest.part`` first; only a complete file whose size and sha256 check out is renamed to ``dest`` (atomic
  on one file system), so ``dest`` never holds a partial or unverified file;
- an interrupted transfer (a dropped connection, a timeout, a 5xx) is resumed with an HTTP ``Range`` request
  (``If-Range`` guards against the file having changed); a server that answers a range request with the whole
  file (200) is followed from byte 0 instead; each attempt has a timeout, and attempts that make no progress are
  bounded (``DownloadPolicy.retries``, exponential back-off);
- a cross-process file lock (``dest.lock``) makes concurrent callers (two replicas on one host) download once:
  the second waits, then finds the file;
- a wrong hash, a truncated body, an HTML page in place of the file, an HTTP error, a size other than the
  manifest's: one ``FetchError`` naming the URL and what was wrong, and no file left behind (only a transfer
  that could not be completed for network reasons keeps its ``.part``, which the next call resumes);
- progress: a bar on a terminal (tqdm), a log line every few seconds otherwise.

Beside ``dest``, ``dest.json`` records the URL, size and sha256 (written before the rename, so a cached file
always has it): a cache hit needs no re-hashing.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
from filelock import FileLock, Timeout

from model.checkpoint import file_sha256
from model.zoo import RemoteFile

log = logging.getLogger("model.download")

CHUNK_BYTES = 1 << 20
MiB = 1024 * 1024
ProgressMode = Literal["auto", "bar", "log", "none"]


class FetchError(RuntimeError):
    """Getting a model failed; the message is one line naming the URL (or file) and what was wrong."""


@dataclass(frozen=True)
class DownloadPolicy:
    """How patient a download is.

    ``timeout_s``: connect and per-read timeout; ``retries``: attempts in a row that may fail without receiving a
    byte before giving up (an attempt that made progress resets the count); ``backoff_s``: the first wait between
    attempts, doubled each time up to ``max_backoff_s``; ``progress``: ``auto`` (a bar on a terminal, log lines
    otherwise), ``bar``, ``log`` or ``none``; ``log_every_s``: seconds between progress log lines;
    ``lock_timeout_s``: longest wait for another process's download of the same file.
    """

    timeout_s: float = 30.0
    retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    progress: ProgressMode = "auto"
    log_every_s: float = 10.0
    lock_timeout_s: float = 3600.0


@dataclass(frozen=True)
class Downloaded:
    """A file in the cache: where, its sha256 (hex), its size in bytes, and whether this call downloaded it."""

    path: Path
    sha256: str
    size: int
    downloaded: bool


class _Retry(Exception):
    """An attempt failed for a reason another attempt may not have (network, 5xx)."""

    def __init__(self, reason: str, keep_partial: bool = True) -> None:
        super().__init__(reason)
        self.keep_partial = keep_partial


def download(remote: RemoteFile, dest: str | Path, policy: DownloadPolicy = DownloadPolicy(),
             client: httpx.Client | None = None) -> Downloaded:
    """``remote`` as the verified file ``dest`` (downloaded, or found in the cache); see the module docstring.

    ``FetchError`` (one line: the URL and the problem) on any failure. ``client``: an ``httpx.Client`` to use
    (default: a new one, which honours ``HTTPS_PROXY``/``NO_PROXY`` from the environment).
    """
    dest = Path(dest)
    hit = cached_file(remote, dest)
    if hit is not None:  # no lock, no write: works on a read-only cache
        return hit
    dest.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(Path(str(dest) + ".lock"), policy.lock_timeout_s, dest.name):
        hit = cached_file(remote, dest)  # another process may have finished it while this one waited
        if hit is not None:
            log.info("%s: downloaded by another process meanwhile", dest.name)
            return hit
        own_client = client is None
        client = client or httpx.Client(follow_redirects=True, timeout=httpx.Timeout(policy.timeout_s))
        try:
            return _download_locked(remote, dest, policy, client)
        finally:
            if own_client:
                client.close()


@contextmanager
def cache_lock(path: Path, timeout_s: float, what: str) -> Iterator[None]:
    """Hold the cross-process lock ``path`` (a file lock; released if the process dies), saying so in the log
    when another process holds it. ``FetchError`` after ``timeout_s`` seconds of waiting."""
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("%s: another process is fetching it; waiting for it to finish (lock %s)", what, path)
        try:
            lock.acquire(timeout=timeout_s)
        except Timeout:
            raise FetchError(f"{what}: still locked by another process after {timeout_s:g} s ({path})") from None
    try:
        yield
    finally:
        lock.release()


def cached_file(remote: RemoteFile, dest: Path) -> Downloaded | None:
    """``dest`` if it is a completed download of ``remote`` (its record names the same URL, its size matches, and
    its sha256 is the expected one where one is known); else None."""
    record = _read_record(dest)
    if record is None or not dest.is_file() or record.get("url") != remote.url:
        return None
    size = dest.stat().st_size
    if size != record.get("size") or (remote.size is not None and size != remote.size):
        return None
    if remote.sha256 is not None and record.get("sha256") != remote.sha256:
        return None
    return Downloaded(dest, str(record["sha256"]), size, downloaded=False)


def remove_download(dest: Path) -> None:
    """Delete a cached file and its record (a file found to be unusable after it was downloaded)."""
    for path in (dest, _record_path(dest), _part_path(dest), _record_path(_part_path(dest))):
        path.unlink(missing_ok=True)


def _download_locked(remote: RemoteFile, dest: Path, policy: DownloadPolicy, client: httpx.Client) -> Downloaded:
    part = _part_path(dest)
    failures, wait = 0, policy.backoff_s
    progress = _Progress(remote.url, dest.name, policy)
    try:
        while True:
            before = part.stat().st_size if part.exists() else 0
            try:
                size = _attempt(remote, part, client, progress)
                break
            except _Retry as exc:
                after = part.stat().st_size if part.exists() else 0
                failures = 0 if after > before else failures + 1
                if failures > policy.retries:
                    kept = exc.keep_partial and after > 0
                    if not kept:
                        _discard(part)
                    note = f"; {after} bytes kept in {part} for the next attempt to resume" if kept else ""
                    raise FetchError(f"{remote.url}: {exc} (gave up after {failures} attempts without "
                                     f"progress{note})") from None
                log.warning("%s: %s; retrying in %.1f s (from byte %d)", remote.url, exc, wait, after)
                time.sleep(wait)
                wait = min(wait * 2, policy.max_backoff_s) if after <= before else policy.backoff_s
            except FetchError:
                _discard(part)
                raise
    finally:
        progress.close()
    digest = file_sha256(part)
    if remote.sha256 is not None and digest != remote.sha256:
        _discard(part)
        raise FetchError(f"{remote.url}: sha256 mismatch: expected {remote.sha256}, got {digest} ({size} bytes); "
                         f"the file was deleted")
    _write_json(_record_path(dest), {"url": remote.url, "size": size, "sha256": digest,
                                     "verified": remote.sha256 is not None})
    os.replace(part, dest)
    _record_path(part).unlink(missing_ok=True)
    log.info("%s: %d bytes, sha256 %s%s", dest.name, size, digest,
             " (verified)" if remote.sha256 else " (no published checksum: recorded, not verified)")
    return Downloaded(dest, digest, size, downloaded=True)


def _attempt(remote: RemoteFile, part: Path, client: httpx.Client, progress: "_Progress") -> int:
    """One GET: append to ``part`` (resuming it when it holds bytes of the same URL); returns the full size."""
    resume = _resume_state(remote.url, part)
    headers = {"Accept-Encoding": "identity"}  # the bytes of the file itself, so Range offsets are file offsets
    if resume is not None:
        headers["Range"] = f"bytes={resume['offset']}-"
        if resume.get("validator"):
            headers["If-Range"] = resume["validator"]
    received, total = 0, None
    try:
        with client.stream("GET", remote.url, headers=headers) as response:
            offset, total = _check_response(remote, response, resume, part)
            # Asked for identity, but a server may compress anyway: then store the decoded bytes, whose length
            # the headers do not give, and never resume (ranges would count compressed bytes).
            encoded = response.headers.get("Content-Encoding", "identity").strip().lower() not in ("identity", "")
            if encoded:
                if offset:
                    _discard(part)
                    raise _Retry("the server compressed a partial response; restarting from byte 0")
                total = None
            progress.start(total, offset)
            mode = "ab" if offset else "wb"
            with open(part, mode) as out:
                if offset == 0 and not encoded:  # a fresh file: what a later range request must match
                    _write_json(_record_path(part), {"url": remote.url, "validator": _validator(response)})
                elif encoded:  # no record: a retry starts from byte 0
                    _record_path(part).unlink(missing_ok=True)
                first = offset == 0
                received = offset
                # iter_raw: as it arrives, so that a dropped connection loses nothing already received
                for chunk in (response.iter_bytes() if encoded else response.iter_raw()):
                    if first:
                        _reject_html(remote.url, response, chunk)
                        first = False
                    out.write(chunk)
                    received += len(chunk)
                    progress.update(received)
    except httpx.RemoteProtocolError:  # the peer closed the connection before the end of the body
        raise _Retry(f"truncated: the connection closed after {received} of {total or 'unknown'} bytes",
                     keep_partial=False) from None
    except (httpx.TimeoutException, httpx.NetworkError) as exc:
        raise _Retry(f"{type(exc).__name__}: {exc or 'no detail'}") from None
    except httpx.HTTPError as exc:
        raise FetchError(f"{remote.url}: {type(exc).__name__}: {exc}") from None
    if total is not None and received != total:
        raise _Retry(f"truncated: received {received} of {total} bytes", keep_partial=False)
    return received


def _check_response(remote: RemoteFile, response: httpx.Response, resume: dict | None,
                    part: Path) -> tuple[int, int | None]:
    """(offset the body starts at, total size or None) of a usable response; ``_Retry`` / ``FetchError`` else."""
    status = response.status_code
    if status == 416 and resume is not None:  # the partial file is no prefix of this one: start again
        _discard(part)
        raise _Retry("the server refused to resume (416 Range Not Satisfiable); restarting from byte 0")
    if status >= 500 or status in (408, 429):
        raise _Retry(f"HTTP {status} {response.reason_phrase}")
    if status >= 400:
        raise FetchError(f"{remote.url}: HTTP {status} {response.reason_phrase}")
    if status not in (200, 206):
        raise FetchError(f"{remote.url}: unexpected HTTP {status} {response.reason_phrase}")
    length = response.headers.get("Content-Length")
    length = int(length) if length is not None and length.isdigit() else None
    if status == 206:
        content_range = response.headers.get("Content-Range", "")
        start, total = _parse_content_range(content_range)
        if resume is None or start != resume["offset"]:
            raise FetchError(f"{remote.url}: the server sent bytes from {start} (Content-Range {content_range!r}), "
                             f"not the ones asked for")
        offset = start
    else:
        if resume is not None:
            log.info("%s: the server sent the whole file instead of resuming at byte %d; restarting from 0",
                     remote.url, resume["offset"])
        offset, total = 0, length
    if remote.size is not None and total is not None and total != remote.size:
        raise FetchError(f"{remote.url}: the server announces {total} bytes, the manifest says {remote.size}")
    return offset, total


def _parse_content_range(value: str) -> tuple[int, int | None]:
    """``bytes 100-999/1000`` -> (100, 1000); total None for ``/*``."""
    try:
        unit, spec = value.split(" ", 1)
        span, total = spec.split("/", 1)
        start = int(span.split("-", 1)[0])
        assert unit == "bytes"
        return start, None if total == "*" else int(total)
    except (ValueError, AssertionError):
        return -1, None


def _reject_html(url: str, response: httpx.Response, first_chunk: bytes) -> None:
    """``FetchError`` when the body is a web page (a login wall, an error page served with 200) not weights."""
    content_type = response.headers.get("Content-Type", "")
    head = first_chunk[:512].lstrip().lower()
    if content_type.startswith("text/html") or head.startswith((b"<!doctype html", b"<html")):
        snippet = first_chunk[:80].decode("utf-8", "replace").replace("\n", " ").strip()
        raise FetchError(f"{url}: the server sent an HTML page (Content-Type {content_type or 'not given'}: "
                         f"{snippet!r}...), not the weights file; check the URL, or the mirror's login")


def _resume_state(url: str, part: Path) -> dict | None:
    """{"offset", "validator"} to resume ``part`` of ``url``, or None (nothing to resume: start at byte 0)."""
    record = _read_record(part)
    if not part.is_file() or record is None or record.get("url") != url:
        return None
    offset = part.stat().st_size
    return {"offset": offset, "validator": record.get("validator")} if offset > 0 else None


def _validator(response: httpx.Response) -> str | None:
    """What ``If-Range`` may carry: a strong ETag, else Last-Modified."""
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified")


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(_record_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _record_path(part).unlink(missing_ok=True)


class _Progress:
    """A tqdm bar (``bar``), log lines every ``log_every_s`` (``log``) or nothing; ``auto`` is a bar when stderr
    is a terminal."""

    def __init__(self, url: str, name: str, policy: DownloadPolicy) -> None:
        mode = policy.progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self._mode, self._url, self._name, self._every = mode, url, name, policy.log_every_s
        self._bar = None
        self._began = self._last_log = time.monotonic()
        self._start_bytes = 0
        self._total: int | None = None

    def start(self, total: int | None, offset: int) -> None:
        self._total, self._start_bytes = total, offset
        self._began = self._last_log = time.monotonic()
        if self._mode == "bar":
            from tqdm import tqdm

            if self._bar is not None:
                self._bar.close()
            self._bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=self._name, file=sys.stderr, dynamic_ncols=True)
        elif self._mode == "log":
            size = f"{total / MiB:.1f} MiB" if total is not None else "size unknown"
            where = f", resuming at {offset / MiB:.1f} MiB" if offset else ""
            log.info("downloading %s (%s%s)", self._url, size, where)

    def update(self, received: int) -> None:
        if self._bar is not None:
            self._bar.update(received - self._bar.n)
        elif self._mode == "log" and time.monotonic() - self._last_log >= self._every:
            self._last_log = time.monotonic()
            log.info("%s: %s", self._name, self._describe(received))

    def _describe(self, received: int) -> str:
        elapsed = max(time.monotonic() - self._began, 1e-6)
        rate = (received - self._start_bytes) / elapsed
        if self._total:
            eta = (self._total - received) / rate if rate > 0 else float("inf")
            return (f"{received / MiB:.1f} of {self._total / MiB:.1f} MiB ({100 * received / self._total:.0f}%), "
                    f"{rate / MiB:.1f} MiB/s, {eta:.0f} s left")
        return f"{received / MiB:.1f} MiB, {rate / MiB:.1f} MiB/s"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
