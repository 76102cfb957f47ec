"""Every error case of the API: its status, the one JSON body shape, a readable message, and its metric."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import png_bytes, segment


def assert_error(response, status: int, type: str, *words: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "type"}, body
    assert body["type"] == type, body
    for word in words:
        assert word in body["error"], body
    return body


def encoded(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def rejected(client, reason: str) -> float:
    text = client.get("/metrics").text
    return float(re.search(rf'^zutis_requests_rejected_total{{reason="{reason}"}} (\S+)$', text, re.M).group(1))


@pytest.fixture
def client(make_client):
    return make_client(max_body_bytes=64 * 1024, max_image_pixels=200 * 200, max_concepts=3,
                       max_concept_length=12, max_instances=5)


def test_bad_uploads(client):
    assert_error(segment(client, b"this is not an image", "cat"), 415, "unsupported_media_type", "not an image")
    ppm = encoded(Image.new("RGB", (8, 8)), "PPM")
    assert_error(segment(client, ppm, "cat"), 415, "unsupported_media_type", "PPM")
    truncated = png_bytes(64, 64)[:200]
    assert_error(segment(client, truncated, "cat"), 400, "invalid_image", "PNG", "could not be decoded")
    assert_error(segment(client, b"", "cat"), 400, "invalid_image", "empty")
    assert rejected(client, "unsupported_media_type") == 2
    assert rejected(client, "invalid_image") == 2


def test_pixel_limit_is_checked_before_decoding(client):
    # 6000 x 6000 one-bit pixels compress to ~4 KB: a small upload that would decode to 36 M pixels.
    bomb = encoded(Image.new("1", (6000, 6000)), "PNG")
    assert len(bomb) < 64 * 1024
    assert_error(segment(client, bomb, "cat"), 413, "image_too_large", "6000x6000", "40,000")
    at_limit = encoded(Image.new("RGB", (200, 200), (90, 30, 200)), "PNG")
    assert segment(client, at_limit, "cat").status_code == 200  # exactly at the limit
    assert rejected(client, "image_too_large") == 1


def test_body_limit_from_content_length_and_while_streaming(client):
    big = np.random.default_rng(0).integers(0, 256, size=(200, 200, 3), dtype=np.uint8)
    noisy_png = encoded(Image.fromarray(big), "PNG")  # ~120 KB: over the 64 KiB body limit
    assert_error(segment(client, noisy_png, "cat"), 413, "body_too_large", "65,536")

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        yield b"--b\r\nContent-Disposition: form-data; name=\"concepts\"\r\n\r\ncat\r\n"
        yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n\r\n"
        for _ in range(20):
            yield b"\0" * 8192
        yield b"\r\n--b--\r\n"

    streamed = client.post("/segment", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert_error(streamed, 413, "body_too_large")
    assert rejected(client, "body_too_large") == 2


def test_missing_fields_and_bad_values_are_422(client):
    image = png_bytes(20, 20)
    body = assert_error(client.post("/segment", data={"concepts": "cat"}), 422, "invalid_request", "image",
                        "required")
    assert "concepts" not in body["error"]
    assert_error(client.post("/segment", files={"image": ("x.png", image, "image/png")}), 422, "invalid_request",
                 "concepts", "required")
    assert_error(segment(client, image, " , ,"), 422, "invalid_request", "no concepts")
    assert_error(segment(client, image, "background"), 422, "invalid_request", "no concepts")
    assert_error(segment(client, image, "a,b,c,d"), 422, "invalid_request", "at most 3")
    assert segment(client, image, ["a", "b,c", "A", "  c "]).json()["concepts"] == ["background", "a", "b", "c"]
    assert_error(segment(client, image, "a really long concept"), 422, "invalid_request", "21 characters", "12")
    assert_error(segment(client, image, "cat", nms_iou="abc"), 422, "invalid_request", "nms_iou")
    assert_error(segment(client, image, "cat", score_threshold=1.5), 422, "invalid_request", "score_threshold")
    assert_error(segment(client, image, "cat", mask_threshold=1.0), 422, "invalid_request", "mask_threshold")
    assert_error(segment(client, image, "cat", semantic="jpeg"), 422, "invalid_request", "semantic")
    assert_error(segment(client, image, "cat", max_instances=6), 422, "invalid_request", "limit of 5")
    assert segment(client, image, "cat", max_instances=5).status_code == 200
    assert rejected(client, "invalid_request") == 11


def test_routing_errors_use_the_same_body(client):
    assert_error(client.get("/nowhere"), 404, "not_found", "/nowhere")
    assert_error(client.get("/segment"), 405, "method_not_allowed", "GET")


def test_api_key(make_client):
    client = make_client(api_key="s3cret")
    image = png_bytes(20, 20)
    response = segment(client, image, "cat")
    assert_error(response, 401, "unauthorized", "API key")
    assert response.headers["www-authenticate"] == "Bearer"
    files = {"image": ("x.png", image, "image/png")}
    wrong = client.post("/segment", files=files, data={"concepts": "cat"}, headers={"X-API-Key": "guess"})
    assert_error(wrong, 401, "unauthorized", "not valid")
    bearer = client.post("/segment", files=files, data={"concepts": "cat"},
                         headers={"Authorization": "Bearer s3cret"})
    assert bearer.status_code == 200
    header = client.post("/segment", files=files, data={"concepts": "cat"}, headers={"X-API-Key": "s3cret"})
    assert header.status_code == 200
    assert_error(client.get("/info"), 401, "unauthorized")
    assert client.get("/info", headers={"X-API-Key": "s3cret"}).json()["auth"] is True
    for open_path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
        assert client.get(open_path).status_code == 200, open_path


def test_api_key_is_checked_before_the_body_is_read(make_client):
    client = make_client(api_key="s3cret")
    read = []

    def body():  # a stranger's body: broken multipart, never to be read
        read.append(True)
        yield b"--b\r\nthis is not multipart at all"

    for headers in ({}, {"X-API-Key": "guess"}, {"Authorization": "Bearer guess"}):
        answer = client.post("/segment", content=body(), headers={"content-type": "multipart/form-data; boundary=b",
                                                                   **headers})
        assert_error(answer, 401, "unauthorized")
        assert answer.headers["connection"] == "close"
    assert read == []
    for content_type in ("application/json", "text/plain"):  # whatever the body, 401 first
        small = client.post("/segment", content=b"{}", headers={"content-type": content_type})
        assert_error(small, 401, "unauthorized")
        # a small declared body is dropped unparsed so that real clients read the 401; the connection stays open
        assert small.headers.get("connection") != "close"
    big = client.post("/segment", content=b"x" * ((1 << 20) + 1), headers={"content-type": "text/plain"})
    assert_error(big, 401, "unauthorized")
    assert big.headers["connection"] == "close"
    assert rejected(client, "unauthorized") == 6
    # An over-limit Content-Length may still be refused at once (413), key or not.
    huge = client.post("/segment", content=b"x", headers={"content-length": str(10**9)})
    assert huge.status_code in (401, 413)


def test_authorization_without_its_scheme_gets_a_hint(make_client):
    client = make_client(api_key="s3cret")
    image = png_bytes(20, 20)
    files = {"image": ("x.png", image, "image/png")}
    no_scheme = client.post("/segment", files=files, data={"concepts": "cat"}, headers={"Authorization": "s3cret"})
    body = assert_error(no_scheme, 401, "unauthorized", "no scheme", "Bearer <key>")
    assert "s3cret" not in body["error"]
    assert_error(client.post("/segment", files=files, data={"concepts": "cat"},
                             headers={"Authorization": "Basic czNjcmV0"}), 401, "unauthorized", "'Basic'", "Bearer")
    assert_error(client.get("/info", headers={"Authorization": "Bearer"}), 401, "unauthorized", "no key after")
    assert client.get("/info", headers={"Authorization": "bearer  s3cret "}).status_code == 200


def test_a_body_that_is_not_multipart_is_400(client):
    # A JSON body is one of the two bodies now (issue 19): it reaches the JSON parser, which names what is missing.
    json_body = client.post("/segment", content=b'{"concepts": ["cat"]}', headers={"content-type": "application/json"})
    assert_error(json_body, 422, "invalid_request", "image", "required")
    for content_type, content in (("text/plain", b"cat"), ("image/png", png_bytes(8, 8)), (None, b"cat")):
        headers = {"content-type": content_type} if content_type else {}
        answer = client.post("/segment", content=content, headers=headers)
        assert_error(answer, 400, "malformed_request", "multipart/form-data", "application/json",
                     content_type or "no Content-Type")
    assert rejected(client, "malformed_request") == 3
    broken = client.post("/segment", content=b"--b\r\nnonsense", headers={"content-type": "multipart/form-data"})
    assert_error(broken, 400, "malformed_request")  # multipart without a boundary: cannot be parsed


@pytest.mark.parametrize("field", ["score_threshold", "mask_threshold", "nms_iou"])
@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "infinity"])
def test_nan_and_infinities_are_named_as_such(client, field, value):
    assert_error(segment(client, png_bytes(20, 20), "cat", **{field: value}), 422, "invalid_request", field,
                 "finite number")


def test_docs_are_served_without_a_cdn(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    assert "http://" not in page.text and "https://" not in page.text, "the page loads something from outside"
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert len(assets) == 3, assets
    for asset in assets:
        answer = client.get(asset)
        assert answer.status_code == 200 and len(answer.content) > 500, asset
    assert "javascript" in client.get("/docs/assets/swagger-ui-bundle.js").headers["content-type"]
    assert client.get("/docs/oauth2-redirect").status_code == 200
    assert client.get("/openapi.json").json()["openapi"].startswith("3.")
    assert_error(client.get("/redoc"), 404, "not_found")
