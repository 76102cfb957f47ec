"""The Python client against real services: answers, masks, semantic maps, overlays, errors, timeouts, retries."""

from __future__ import annotations

import ast
import asyncio
import base64
import io
import json
import re
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from tests.live_service import REPO_ROOT
from tests.support import free_port
from zutis_client import AsyncClient, Client, RetryPolicy, SegmentResult, ZutisError, decode_rle

pytestmark = pytest.mark.integration

EXAMPLES = sorted((REPO_ROOT / "examples").glob("shapes-*.png"))
CONCEPTS = ["red circle", "blue star", "green heart"]
CLIENT_DIR = REPO_ROOT / "client"


def direct_answer(url: str, image: Path, concepts: list[str], **fields: str) -> dict:
    """The service's JSON for the same request, made without the client."""
    answer = httpx.post(f"{url}/segment", files={"image": image.open("rb")}, data={"concepts": concepts, **fields},
                        timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def rejections(url: str, reason: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(re.search(rf'^zutis_requests_rejected_total{{reason="{reason}"}} (\S+)$', text, re.M).group(1))


def test_rle_decoder_matches_pycocotools():
    rng = np.random.default_rng(0)
    for height, width, density in [(1, 1, 0.5), (7, 13, 0.0), (7, 13, 1.0), (64, 48, 0.3), (300, 200, 0.02)]:
        mask = rng.random((height, width)) < density
        mask[height // 3: height // 2, width // 4: width // 2] = True if density > 0 else False
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        decoded = decode_rle(rle)
        assert decoded.dtype == bool and decoded.shape == (height, width)
        assert np.array_equal(decoded, mask)
    with pytest.raises(ValueError, match="add up"):
        decode_rle({"size": [4, 4], "counts": "3"})
    with pytest.raises(ZutisError, match="add up"):  # a ZutisError too
        decode_rle({"size": [4, 4], "counts": "3"})


def test_segment_gives_the_service_answer_with_masks_and_semantic_map(live_url):
    with Client(live_url) as client:
        assert client.ready()
        result = client.segment(EXAMPLES[0], CONCEPTS)
        as_rle = client.segment(EXAMPLES[0].read_bytes(), ",".join(CONCEPTS), semantic="rle")
        none = client.segment(Image.open(EXAMPLES[0]), CONCEPTS, semantic="none", max_instances=1)
    direct = direct_answer(live_url, EXAMPLES[0], CONCEPTS)
    assert isinstance(result, SegmentResult)
    assert result.concepts == ["background", *CONCEPTS] and (result.width, result.height) == (128, 128)
    assert result.raw["instances"] == direct["instances"] and result.raw["semantic"] == direct["semantic"]
    assert len(result.instances) >= 2
    expected = mask_utils.decode([i["segmentation"] for i in direct["instances"]]).transpose(2, 0, 1).astype(bool)
    assert np.array_equal(result.masks(), expected)
    for instance, raw in zip(result.instances, direct["instances"]):
        assert (instance.concept, instance.score, list(instance.bbox), instance.area) == (
            raw["concept"], raw["score"], raw["bbox"], raw["area"])
        assert int(instance.mask.sum()) == instance.area

    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(direct["semantic"]["png"]))))
    assert result.semantic_map.shape == (128, 128) and np.array_equal(result.semantic_map, png)
    assert np.array_equal(as_rle.semantic_map, png), "the RLE form decodes to the same map"
    assert none.semantic_map is None and len(none.instances) == 1


def test_async_client_gives_the_same_answers(live_url):
    async def run() -> list[SegmentResult]:
        async with AsyncClient(live_url) as client:
            assert await client.ready()
            return await asyncio.gather(*(client.segment(path, CONCEPTS) for path in EXAMPLES))

    results = asyncio.run(run())
    for path, result in zip(EXAMPLES, results):
        assert result.raw["instances"] == direct_answer(live_url, path, CONCEPTS)["instances"]


def test_overlay_blends_each_mask_in_its_colour(live_url):
    from zutis_client.overlay import PALETTE

    with Client(live_url) as client:
        result = client.segment(EXAMPLES[0], CONCEPTS)
    original = np.asarray(Image.open(EXAMPLES[0]).convert("RGB")).astype(np.float32)
    drawn = np.asarray(result.overlay(EXAMPLES[0], alpha=0.5, labels=False)).astype(np.float32)
    masks = result.masks()
    union = masks.any(axis=0)
    assert np.array_equal(drawn[~union], original[~union])
    top = masks[0] & ~masks[1:].any(axis=0)  # the best instance's own pixels (masks may overlap)
    assert top.any()
    expected = 0.5 * original[top] + 0.5 * np.array(PALETTE[0], dtype=np.float32)
    assert np.abs(drawn[top] - expected).max() <= 1.0
    labelled = result.overlay(Image.open(EXAMPLES[0]))
    assert labelled.size == (128, 128)
    with pytest.raises(ValueError, match="overlay the image that was sent"):
        result.overlay(np.zeros((10, 10, 3), dtype=np.uint8))


def test_errors_carry_the_service_type_and_message(live_url):
    with Client(live_url) as client:
        with pytest.raises(ZutisError) as bad_value:
            client.segment(EXAMPLES[0], CONCEPTS, score_threshold=2.0)
        with pytest.raises(ZutisError) as not_an_image:
            client.segment(b"this is not an image", CONCEPTS)
        with pytest.raises(ValueError, match="no concepts"):
            client.segment(EXAMPLES[0], [" ", ","])
        for concepts in ([], [" ", ","]):  # every failure of the library is a ZutisError (a ValueError too)
            with pytest.raises(ZutisError) as no_concepts:
                client.segment(EXAMPLES[0], concepts)
            assert no_concepts.value.type == "invalid_argument" and no_concepts.value.status is None
        with pytest.raises(ZutisError) as missing:
            client.segment(Path("/nonexistent/photo.jpg"), CONCEPTS)
        assert missing.value.type == "unreadable_image"
    assert (bad_value.value.status, bad_value.value.type) == (422, "invalid_request")
    assert "score_threshold" in bad_value.value.message
    assert not_an_image.value.status in (400, 415)
    assert not_an_image.value.type in ("invalid_image", "unsupported_media_type")
    with Client(f"http://127.0.0.1:{free_port()}", timeout_s=2) as nowhere:
        assert not nowhere.ready()
        with pytest.raises(ZutisError) as refused:
            nowhere.segment(EXAMPLES[0], CONCEPTS)
    assert refused.value.type == "connection_error" and refused.value.status is None


def test_api_key_is_sent(serve):
    url, _ = serve(api_key="k3y")
    with Client(url) as anonymous, pytest.raises(ZutisError) as refused:
        anonymous.segment(EXAMPLES[0], ["cat"])
    assert (refused.value.status, refused.value.type) == (401, "unauthorized")
    with Client(url, api_key="k3y") as client:
        assert client.segment(EXAMPLES[0], ["cat"]).concepts == ["background", "cat"]
        assert client.info()["auth"] is True


def test_timeout_is_a_zutis_error(serve):
    url, predictor = serve()
    predictor.delay_s = 3.0
    started = time.monotonic()
    with Client(url, timeout_s=0.5) as client, pytest.raises(ZutisError) as late:
        client.segment(EXAMPLES[0], ["cat"])
    assert late.value.type == "timeout" and late.value.status is None
    assert time.monotonic() - started < 2.5


def test_503_is_retried_after_retry_after_then_raised(serve):
    url, _ = serve(ready=False, retry_after_s=1)
    before = rejections(url, "not_ready")
    started = time.monotonic()
    with Client(url, retry=RetryPolicy(retries=2, max_wait_s=5)) as client, pytest.raises(ZutisError) as refused:
        client.segment(EXAMPLES[0], ["cat"])
    elapsed = time.monotonic() - started
    assert (refused.value.status, refused.value.type, refused.value.retry_after_s) == (503, "not_ready", 1.0)
    assert rejections(url, "not_ready") - before == 3, "one try and two retries"
    assert 2.0 <= elapsed < 4.0, f"two waits of Retry-After = 1 s, took {elapsed:.2f} s"


def test_retry_wait_is_bounded(serve):
    url, _ = serve(ready=False, retry_after_s=30)
    before = rejections(url, "not_ready")
    started = time.monotonic()

    async def run() -> None:
        async with AsyncClient(url, retry=RetryPolicy(retries=3, max_wait_s=0.2)) as client:
            await client.segment(EXAMPLES[0], ["cat"])

    with pytest.raises(ZutisError) as refused:
        asyncio.run(run())
    assert refused.value.retry_after_s == 30.0
    assert rejections(url, "not_ready") - before == 4
    assert time.monotonic() - started < 3.0, "each wait is cut to max_wait_s, not the 30 s asked for"


def test_retry_succeeds_once_the_service_is_ready(serve):
    url, predictor = serve(ready=False, retry_after_s=1)
    opener = threading.Timer(1.5, predictor.gate.set)
    opener.start()
    try:
        with Client(url, retry=RetryPolicy(retries=10, max_wait_s=2)) as client:
            result = client.segment(EXAMPLES[0], ["cat", "dog"])
    finally:
        opener.cancel()
    assert result.concepts == ["background", "cat", "dog"]
    assert rejections(url, "not_ready") >= 1


def test_client_package_needs_no_torch(live_url, tmp_path):
    # Its declared dependencies and its imports: nothing from torch or from this repository's model/service.
    project = tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    assert not [d for d in declared if re.match(r"(torch|open.clip|zutis-service)\b", d)], declared
    for path in (CLIENT_DIR / "zutis_client").glob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        roots = {m.split(".")[0] for m in modules}
        assert not roots & {"torch", "model", "service", "open_clip", "pycocotools"}, (path.name, roots)
    # The library and the command line at work with torch made unimportable (None in sys.modules: ImportError).
    code = ("import sys; sys.modules['torch'] = None; from zutis_client.cli import main; "
            f"sys.exit(main(['--url', {live_url!r}, 'segment', {str(EXAMPLES[0])!r}, '--concepts', 'red circle', "
            f"'--no-progress', '--out', {str(tmp_path / 'out.json')!r}, '--overlay-dir', {str(tmp_path)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=CLIENT_DIR, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "answer" in json.loads((tmp_path / "out.json").read_text())["results"][0]


def test_retry_policy_reads_retry_after_in_both_forms_and_caps_the_wait():
    import email.utils

    policy = RetryPolicy(retries=3, max_wait_s=5.0, backoff_s=0.5)
    seconds = httpx.Response(503, headers={"Retry-After": "2"})
    in_a_minute = httpx.Response(503, headers={"Retry-After": email.utils.formatdate(time.time() + 60, usegmt=True)})
    bare = httpx.Response(503)
    assert policy.delay_s(seconds, 0) == 2.0
    assert policy.delay_s(in_a_minute, 0) == 5.0, "an HTTP date a minute away, capped at max_wait_s"
    assert [policy.delay_s(bare, attempt) for attempt in range(4)] == [0.5, 1.0, 2.0, None]
    assert policy.delay_s(httpx.Response(500), 0) is None and policy.delay_s(httpx.Response(429), 0) is None
    with pytest.raises(ValueError):
        RetryPolicy(retries=-1)
    with pytest.raises(ZutisError, match="must be >= 0"):  # every failure of the library is a ZutisError
        RetryPolicy(backoff_s=-1.0)


def test_info_separates_trained_from_evaluated_only_concepts(live_url):
    with Client(live_url) as client:
        info = client.info()
    assert len(info["vocabulary"]) == 65 and info["vocabulary"][0] == "background"
    assert len(info["trained_concepts"]) == 48 and len(info["evaluated_only_concepts"]) == 16
    assert set(info["trained_concepts"]) | set(info["evaluated_only_concepts"]) == set(info["vocabulary"][1:])
    assert not set(info["trained_concepts"]) & set(info["evaluated_only_concepts"])
    assert "green heart" in info["evaluated_only_concepts"]  # the README's example of a concept never trained on
