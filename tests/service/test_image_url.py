"""image_url: off unless ZUTIS_IMAGE_URL_HOSTS lists the host; server-side request forgery refused (issue 19).

A loopback HTTP server started by the test serves the images; loopback is refused unless listed as an address.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from service.errors import ServiceError
from service.image_url import UrlPolicy, fetch
from tests.service.conftest import png_bytes, segment
from tests.service.test_errors import assert_error

IMAGE = png_bytes(26, 34, seed=4)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path
        if path == "/image.png":
            return self._send(200, IMAGE, "image/png")
        if path == "/big.png":
            return self._send(200, b"\0" * (200 * 1024), "image/png")
        if path == "/text":
            return self._send(200, b"hello", "text/plain")
        if path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", path.partition("=")[2])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if path == "/slow":
            time.sleep(1.5)
            return self._send(200, IMAGE, "image/png")
        return self._send(404, b"not here", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def by_url(client, url: str, **fields):
    return client.post("/segment", data={"image_url": url, "concepts": "cat", **fields})


def test_image_url_is_off_by_default(make_client, server):
    client = make_client()
    assert_error(by_url(client, f"{server}/image.png"), 422, "invalid_request", "ZUTIS_IMAGE_URL_HOSTS")
    assert client.get("/info").json()["image_url"]["enabled"] is False


def test_listed_loopback_address_is_fetched_and_answers_as_the_upload(make_client, server):
    client = make_client(image_url_hosts="127.0.0.1", max_body_bytes=64 * 1024, image_url_timeout_s=1.0)
    fetched = by_url(client, f"{server}/image.png", semantic="rle")
    assert fetched.status_code == 200, fetched.text
    uploaded = segment(client, IMAGE, "cat", semantic="rle")
    drop = lambda a: {k: v for k, v in a.json().items() if k != "timings"}  # noqa: E731
    assert drop(fetched) == drop(uploaded)
    as_json = client.post("/segment", json={"image_url": f"{server}/image.png", "concepts": ["cat"],
                                            "semantic": "rle"})
    assert drop(as_json) == drop(uploaded)
    assert client.get("/info").json()["image_url"] == {"enabled": True, "hosts": ["127.0.0.1"], "timeout_s": 1.0}
    # redirects within the list are followed
    assert by_url(client, f"{server}/redirect?to=/image.png").status_code == 200
    # ... but not to a host off the list (localhost is a name, not the listed address)
    port = server.rpartition(":")[2]
    assert_error(by_url(client, f"{server}/redirect?to=http://localhost:{port}/image.png"), 422, "invalid_request",
                 "'localhost'", "not in")
    assert_error(by_url(client, f"{server}/big.png"), 413, "image_too_large", "65,536")
    assert_error(by_url(client, f"{server}/text"), 415, "unsupported_media_type")
    assert_error(by_url(client, f"{server}/missing"), 400, "invalid_image", "HTTP 404")
    assert_error(by_url(client, f"{server}/slow"), 400, "invalid_image", "within 1 s")
    assert_error(by_url(client, f"ftp://127.0.0.1:{port}/image.png"), 422, "invalid_request", "http and https")
    assert_error(by_url(client, f"http://user:pw@127.0.0.1:{port}/image.png"), 422, "invalid_request", "credentials")
    two = client.post("/segment", files={"image": ("x.png", IMAGE, "image/png")},
                      data={"image_url": f"{server}/image.png", "concepts": "cat"})
    assert_error(two, 422, "invalid_request", "not both")


def test_a_listed_name_that_resolves_to_loopback_is_refused(make_client, server):
    client = make_client(image_url_hosts="localhost")
    port = server.rpartition(":")[2]
    assert_error(by_url(client, f"http://localhost:{port}/image.png"), 422, "invalid_request", "non-public",
                 "127.0.0.1")
    assert_error(by_url(client, f"{server}/image.png"), 422, "invalid_request", "'127.0.0.1'", "not in")


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
                                     "100.64.0.1", "0.0.0.0", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1",
                                     "224.0.0.1"])
def test_non_public_addresses_are_refused_unless_listed(address):
    parsed = ipaddress.ip_address(address)
    assert not UrlPolicy.from_list(["example.com"]).allows_address(parsed)
    assert UrlPolicy.from_list([address]).allows_address(parsed)
    assert UrlPolicy.from_list(["0.0.0.0/0", "::/0"]).allows_address(parsed)
    assert UrlPolicy.from_list(["example.com"]).allows_address(ipaddress.ip_address("93.184.216.34"))


def test_fetch_refuses_an_unlisted_private_address_before_connecting():
    policy = UrlPolicy.from_list(["10.0.0.0/8"])
    with pytest.raises(ServiceError) as refused:
        fetch("http://192.168.0.1/x.png", policy, 1.0, 1024)
    assert refused.value.type == "invalid_request" and "not in" in refused.value.message
