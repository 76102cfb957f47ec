"""Fetching a request's ``image_url``: opt-in, and guarded against server-side request forgery.

Only hosts named in ``ZUTIS_IMAGE_URL_HOSTS`` are fetched (exact host names or IP addresses, case-insensitive;
``http`` and ``https`` only; no user:password in the URL). Every address a host resolves to must be public: a
loopback, private, link-local, shared, reserved, multicast or unspecified address is refused unless the list
names that address itself (``127.0.0.1``, ``::1``) or a network holding it (``10.0.0.0/8``); a host *name* on the
list that resolves to a private address is refused (DNS rebinding). The connection goes to the address that was
checked (not resolved again), TLS still verifies the host name. Redirects (at most ``MAX_REDIRECTS``) are followed
only to URLs that pass the same checks. The whole fetch has one deadline, the body is cut at ``max_bytes``
(the service's body limit), and the pixel limit applies when the image is decoded, as for an upload.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from service.errors import ServiceError

MAX_REDIRECTS = 3
CHUNK_BYTES = 64 * 1024
ENABLE_HINT = ("image_url is off on this service; its operator can allow hosts with ZUTIS_IMAGE_URL_HOSTS "
               "(comma-separated host names), or send the image itself")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class UrlPolicy:
    """Which URLs may be fetched: ``hosts`` (lower-case names or address literals) and ``networks`` (CIDR entries
    and address literals of the list, the only non-public addresses allowed)."""

    hosts: frozenset[str]
    networks: tuple[IPNetwork, ...]

    @classmethod
    def from_list(cls, entries: Iterable[str]) -> UrlPolicy:
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in (e.strip().lower().rstrip(".") for e in entries):
            if not entry:
                continue
            try:
                network = ipaddress.ip_network(entry.strip("[]"), strict=False)
            except ValueError:
                hosts.add(entry)
                continue
            networks.append(network)
            if network.num_addresses == 1:
                hosts.add(str(network.network_address))
        return cls(frozenset(hosts), tuple(networks))

    @property
    def enabled(self) -> bool:
        return bool(self.hosts or self.networks)

    def allows_address(self, address: IPAddress) -> bool:
        """Whether a resolved address may be connected to: a listed one, or a public unicast one (an IPv4-mapped
        IPv6 address is judged as its IPv4 address)."""
        candidates = [address]
        if address.version == 6 and address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
        if any(a in network for a in candidates for network in self.networks if a.version == network.version):
            return True
        plain = candidates[-1]
        return plain.is_global and not plain.is_multicast

    def allows_host(self, host: str) -> bool:
        if host in self.hosts:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.networks)


@dataclass(frozen=True)
class UrlImage:
    """An image to fetch from ``url`` (in a worker thread, through ``read``)."""

    url: str
    policy: UrlPolicy
    timeout_s: float
    max_bytes: int

    def read(self) -> bytes:
        return fetch(self.url, self.policy, self.timeout_s, self.max_bytes)


def check_url(url: str, policy: UrlPolicy) -> None:
    """The checks that need no network (422 when the URL may not be fetched); run at the edge."""
    if not policy.enabled:
        raise ServiceError("invalid_request", ENABLE_HINT)
    _parse(url, policy)


def _parse(url: str, policy: UrlPolicy) -> tuple[str, str, int, str]:
    """``(scheme, host, port, path_and_query)`` of an allowed URL, or a 422."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ServiceError("invalid_request", f"image_url: not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ServiceError("invalid_request", f"image_url: only http and https URLs are fetched, got "
                           f"{scheme or 'no scheme'!r}")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise ServiceError("invalid_request", "image_url: the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise ServiceError("invalid_request", "image_url: URLs with credentials are not fetched")
    if not policy.allows_host(host):
        raise ServiceError("invalid_request", f"image_url: host {host!r} is not in this service's list of image "
                           "hosts (ZUTIS_IMAGE_URL_HOSTS)")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, host, port or (443 if scheme == "https" else 80), path


def _resolve(host: str, port: int, policy: UrlPolicy, deadline: float) -> IPAddress:
    """The first address of ``host``, once every address it resolves to passed the policy."""
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        if time.monotonic() > deadline:
            raise ServiceError("invalid_image", "image_url: timed out")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise ServiceError("invalid_image", f"image_url: host {host!r} could not be resolved ({exc})") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    refused = [a for a in addresses if not policy.allows_address(a)]
    if refused or not addresses:
        raise ServiceError("invalid_request", f"image_url: host {host!r} resolves to a non-public address "
                           f"({refused[0] if refused else 'none'}); list that address in ZUTIS_IMAGE_URL_HOSTS "
                           "to allow it")
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to an address already checked (the Host header keeps the name)."""

    def __init__(self, host: str, address: IPAddress, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = str(address)

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection to an address already checked; the certificate is verified for the host name."""

    def __init__(self, host: str, address: IPAddress, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = str(address)

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def fetch(url: str, policy: UrlPolicy, timeout_s: float, max_bytes: int) -> bytes:
    """The body of ``url`` (after allowed redirects), at most ``max_bytes``, within ``timeout_s`` in all.

    Raises:
        ServiceError: 422 a URL, redirect or address the policy refuses; 413 a body over ``max_bytes``; 400
        (``invalid_image``) unreachable, timed out, or an HTTP error status.
    """
    deadline = time.monotonic() + timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        scheme, host, port, path = _parse(url, policy)
        address = _resolve(host, port, policy, deadline)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ServiceError("invalid_image", f"image_url: no answer within {timeout_s:g} s")
        kind = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
        connection = kind(host, address, port, remaining)
        try:
            connection.request("GET", path, headers={"Accept": "image/*", "User-Agent": "zutis-service"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise ServiceError("invalid_image", f"image_url: HTTP {response.status} without a Location")
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise ServiceError("invalid_image", f"image_url: the server answered HTTP {response.status}")
            declared = response.getheader("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise ServiceError("image_too_large", f"image_url: the image is {int(declared):,} bytes; the limit "
                                   f"is {max_bytes:,}")
            return _read_body(response, max_bytes, deadline, timeout_s)
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, (socket.timeout, TimeoutError)):
                raise ServiceError("invalid_image", f"image_url: no answer within {timeout_s:g} s") from None
            raise ServiceError("invalid_image", f"image_url: could not be fetched ({exc})") from None
        finally:
            connection.close()
    raise ServiceError("invalid_image", f"image_url: more than {MAX_REDIRECTS} redirects")


def _read_body(response: http.client.HTTPResponse, max_bytes: int, deadline: float, timeout_s: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise ServiceError("invalid_image", f"image_url: no answer within {timeout_s:g} s")
        chunk = response.read(CHUNK_BYTES)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise ServiceError("image_too_large", f"image_url: the image is over the limit of {max_bytes:,} bytes")
        chunks.append(chunk)


__all__ = ["UrlPolicy", "UrlImage", "check_url", "fetch", "MAX_REDIRECTS", "ENABLE_HINT"]
