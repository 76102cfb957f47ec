"""The demo page's route and assets (no browser here: tests/service/test_demo_page.py drives a real one)."""

from __future__ import annotations

import re

from service.routes.demo import STATIC_DIR
from tests.service.conftest import png_bytes, segment

KEY = "s3cret-key"


def test_demo_page_is_public_while_segment_needs_the_key(make_client):
    client = make_client(api_key=KEY)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert KEY not in page.text
    for asset in re.findall(r'(?:src|href)="(demo/[^"]+)"', page.text):
        answer = client.get(f"/{asset}")
        assert answer.status_code == 200, asset
        assert answer.headers["content-type"].split(";")[0] in {"text/css", "text/javascript"}, asset
    assert segment(client, png_bytes(16, 16), "cat").status_code == 401
    keyed = client.post("/segment", files={"image": ("x.png", png_bytes(16, 16), "image/png")},
                        data={"concepts": "cat"}, headers={"X-API-Key": KEY})
    assert keyed.status_code == 200, keyed.text


def test_demo_assets_are_all_local(make_client):
    # Nothing from a CDN or any other host: the page must work on an offline machine.
    files = sorted(STATIC_DIR.iterdir())
    assert {f.name for f in files} >= {"index.html", "demo.js", "demo.css"}
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(?:src|href)=\"(?:https?:)?//", text), path.name
        assert not re.search(r"url\(\s*['\"]?(?:https?:)?//", text), path.name
        assert not re.search(r"(?:import|fetch)\s*\(\s*['\"`](?:https?:)?//", text), path.name


def test_unknown_asset_is_a_json_404(make_client):
    answer = make_client().get("/demo/nothing.js")
    assert answer.status_code == 404 and answer.json()["type"] == "not_found"


def test_openapi_description_links_the_demo_page(make_client):
    description = make_client().get("/openapi.json").json()["info"]["description"]
    assert "[the demo page](/)" in description
    assert "/" not in make_client().get("/openapi.json").json()["paths"]


def test_demo_defaults_are_the_checkpoints_and_public(make_client):
    client = make_client(api_key=KEY)
    defaults = client.get("/demo/defaults.json")
    assert defaults.status_code == 200, defaults.text
    info = client.get("/info", headers={"X-API-Key": KEY}).json()["inference_defaults"]
    assert defaults.json() == {"score_threshold": info["score_threshold"], "mask_threshold": info["mask_threshold"]}
    page = client.get("/").text
    for slider, field in (("score-threshold", "score_threshold"), ("mask-threshold", "mask_threshold")):
        tag = re.search(rf'<input id="{slider}"[^>]*>', page).group(0)
        assert "disabled" not in tag and float(re.search(r'value="([^"]+)"', tag).group(1)) == info[field], tag
        label = re.search(rf'<output id="{slider}-value"[^>]*>([^<]*)</output>', page).group(1)
        assert label == f"model default ({info[field]:.2f})"
