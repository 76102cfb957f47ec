"""``model.fetch`` and ``model.download`` against a local mirror (loopback HTTP server the tests start): fetch,
cache hit, resume, a server without Range, and every failure a user may meet, each one clear error that names the
URL and leaves nothing behind; two processes fetching at once download once; the checkpoint answers exactly as
the one ``model.convert_official`` writes from the same files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import read_metadata
from model.config import tiny_test_config
from model.download import DownloadPolicy, FetchError, download
from model.fetch import checkpoint_path, download_path, explicit_model, fetch_model, main
from model.predictor import Predictor
from model.zoo import RemoteFile, find_model
from tests.model.conftest import tiny_official_conversion
from tests.model.mirror import Behaviour, MirrorServer, publish_tiny_release, write_manifest

REPO_ROOT = Path(__file__).resolve().parents[2]
FAST = DownloadPolicy(timeout_s=5.0, retries=2, backoff_s=0.01, progress="log", log_every_s=0.0)
ZUTIS, CLIP = "zoo/coco_vit_tiny.pt", "zoo/ViT-tiny.pt"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The tiny random release's files and model.convert_official's checkpoint of them."""
    return tiny_official_conversion(tmp_path_factory.mktemp("release"), command="reference")


@pytest.fixture
def mirror():
    with MirrorServer() as running:
        yield running


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(key, raising=False)


def zoo_model(tmp_path, mirror, release, name="tiny-coco", **overrides):
    manifest = write_manifest(tmp_path / "zoo.json", {name: publish_tiny_release(mirror, release, name,
                                                                                 **overrides)})
    return find_model(name, manifest)


def leftovers(cache: Path) -> list[str]:
    """Every file in the cache except lock files (which hold no data)."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- fetch, cache, equality with model.convert_official ----------------------------------------------------------


def test_fetch_downloads_converts_and_records_every_hash(tmp_path, mirror, release, caplog):
    model = zoo_model(tmp_path, mirror, release)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO):
        result = fetch_model(model, cache, policy=FAST, command="test")
    assert not result.cached
    assert result.checkpoint == checkpoint_path(model, cache) and result.checkpoint.is_file()
    zutis, clip = mirror.files[ZUTIS], mirror.files[CLIP]
    assert result.sha256 == {"zutis": sha256(zutis), "clip": sha256(clip)}
    prov = read_metadata(result.checkpoint).provenance
    assert prov["zutis_sha256"] == sha256(zutis) and prov["clip_sha256"] == sha256(clip)
    assert prov["zutis_url"] == mirror.url(ZUTIS) and prov["clip_url"] == mirror.url(CLIP)
    assert prov["zutis_sha256_verified"] is False and prov["clip_sha256_verified"] is True
    assert prov["zoo_model"] == "tiny-coco" and prov["zoo_key"] == model.cache_key()
    # the downloads are in the cache under their final names, complete
    assert download_path(mirror.url(ZUTIS), cache).read_bytes() == zutis
    assert download_path(mirror.url(CLIP), cache).read_bytes() == clip
    assert not [p for p in cache.rglob("*") if p.name.endswith((".part", ".tmp"))]
    assert any(f"downloading {mirror.url(ZUTIS)}" in r.getMessage() for r in caplog.records)
    assert mirror.full_downloads(ZUTIS) == mirror.full_downloads(CLIP) == 1


def test_fetched_checkpoint_answers_exactly_as_convert_official(tmp_path, mirror, release):
    model = zoo_model(tmp_path, mirror, release)
    fetched = fetch_model(model, tmp_path / "cache", policy=FAST).checkpoint
    ours, reference = load_file(str(fetched)), load_file(str(release["out"]))
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    meta, ref_meta = read_metadata(fetched), read_metadata(release["out"])
    assert (meta.vocabulary, meta.inference, meta.input_size, meta.geometry, meta.model_config) == (
        ref_meta.vocabulary, ref_meta.inference, ref_meta.input_size, ref_meta.geometry, ref_meta.model_config)
    images = [np.random.default_rng(seed).integers(0, 256, (48 + 8 * seed, 64, 3), dtype=np.uint8)
              for seed in range(2)]
    a = Predictor.from_checkpoint(fetched, "cpu", "float32", 64).predict(images, ["cat", "dog", "person"])
    b = Predictor.from_checkpoint(release["out"], "cpu", "float32", 64).predict(images, ["cat", "dog", "person"])
    for x, y in zip(a, b):
        assert np.array_equal(x.semantic, y.semantic)
        assert [(i.concept, i.score, i.segmentation["counts"]) for i in x.instances] == [
            (i.concept, i.score, i.segmentation["counts"]) for i in y.instances]


def test_second_fetch_is_a_cache_hit_without_any_request(tmp_path, mirror, release):
    model = zoo_model(tmp_path, mirror, release)
    first = fetch_model(model, tmp_path / "cache", policy=FAST)
    requests = len(mirror.requests)
    second = fetch_model(model, tmp_path / "cache", policy=FAST)
    assert second.cached and second.checkpoint == first.checkpoint and second.sha256 == first.sha256
    assert len(mirror.requests) == requests


def test_cache_hit_needs_no_write_access(tmp_path, mirror, release, monkeypatch):
    # A read-only cache (the pod's volume as the serving container mounts it) is enough for a hit: no lock is
    # taken and nothing is written. (Permissions cannot show it here: the tests may run as root.)
    model = zoo_model(tmp_path, mirror, release)
    cache = tmp_path / "cache"
    fetch_model(model, cache, policy=FAST)
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}

    def no_lock(*args, **kwargs):
        raise AssertionError("a cache hit took a lock")

    monkeypatch.setattr("model.download.FileLock", no_lock)
    assert fetch_model(model, cache, policy=FAST).cached
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == before


def test_a_changed_entry_gets_its_own_checkpoint_and_reuses_the_downloads(tmp_path, mirror, release):
    model = zoo_model(tmp_path, mirror, release)
    first = fetch_model(model, tmp_path / "cache", policy=FAST)
    other = zoo_model(tmp_path, mirror, release, input_size=320)
    second = fetch_model(other, tmp_path / "cache", policy=FAST)
    assert second.checkpoint != first.checkpoint and not second.cached
    assert read_metadata(second.checkpoint).input_size == 320
    assert mirror.full_downloads(ZUTIS) == mirror.full_downloads(CLIP) == 1  # the files came from the cache


def test_out_writes_the_checkpoint_there(tmp_path, mirror, release):
    model = zoo_model(tmp_path, mirror, release)
    out = tmp_path / "elsewhere" / "model.safetensors"
    result = fetch_model(model, tmp_path / "cache", out=out, policy=FAST)
    assert result.checkpoint == out and out.is_file()
    assert not checkpoint_path(model, tmp_path / "cache").exists()
    assert fetch_model(model, tmp_path / "cache", out=out, policy=FAST).cached


# -- resume and restart --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ranges, retry_status", [(True, 206), (False, 200)],
                         ids=["resumes-with-range", "server-without-range-restarts-from-zero"])
def test_a_dropped_connection_is_resumed_or_restarted(tmp_path, mirror, release, ranges, retry_status):
    # The retry asks for the rest; a server that ignores Range answers 200 with the whole file, which is taken
    # from byte 0.
    model = zoo_model(tmp_path, mirror, release)
    mirror.behaviour[ZUTIS] = Behaviour(ranges=ranges, drop_after=300_000, drops=1)
    result = fetch_model(model, tmp_path / "cache", policy=FAST)
    requests = mirror.requests_for(ZUTIS)
    assert [(r.range, r.status) for r in requests] == [(None, 200), ("bytes=300000-", retry_status)]
    assert result.sha256["zutis"] == sha256(mirror.files[ZUTIS])
    assert download_path(mirror.url(ZUTIS), tmp_path / "cache").read_bytes() == mirror.files[ZUTIS]


def test_resume_of_a_partial_file_left_by_an_earlier_process(tmp_path, mirror):
    # A process killed mid-download leaves dest.part and its record; the next call asks only for the rest.
    data = os.urandom(700_000)
    mirror.files["blob.bin"] = data
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(data[:250_000])
    etag = '"' + sha256(data)[:16] + '"'  # the mirror's ETag
    dest.with_name("blob.bin.part.json").write_text(json.dumps({"url": mirror.url("blob.bin"), "validator": etag}))
    got = download(RemoteFile(mirror.url("blob.bin"), sha256(data)), dest, FAST)
    assert got.downloaded and got.sha256 == sha256(data) and dest.read_bytes() == data
    assert [(r.range, r.status) for r in mirror.requests_for("blob.bin")] == [("bytes=250000-", 206)]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["blob.bin",
                                                                                          "blob.bin.json"]


def test_a_changed_file_is_not_resumed(tmp_path, mirror):
    # If-Range: the partial file's ETag no longer matches, the server sends the new file whole.
    old, new = os.urandom(400_000), os.urandom(400_000)
    dest = tmp_path / "f.bin"
    dest.with_name("f.bin.part").write_bytes(old[:100_000])
    dest.with_name("f.bin.part.json").write_text('{"url": "%s", "validator": "\\"stale\\""}' % mirror.url("f.bin"))
    mirror.files["f.bin"] = new
    got = download(RemoteFile(mirror.url("f.bin"), sha256(new)), dest, FAST)
    assert got.downloaded and dest.read_bytes() == new
    assert [(r.range, r.status) for r in mirror.requests_for("f.bin")] == [("bytes=100000-", 200)]


# -- failures: one clear error naming the URL, nothing left behind --------------------------------------------------


def test_wrong_hash(tmp_path, mirror, release):
    model = zoo_model(tmp_path, mirror, release, clip={"url": mirror.url(CLIP), "sha256": "ab" * 32})
    cache = tmp_path / "cache"
    with pytest.raises(FetchError) as error:
        fetch_model(model, cache, policy=FAST)
    message = str(error.value)
    assert message.startswith(mirror.url(CLIP) + ": sha256 mismatch: expected " + "ab" * 32)
    assert sha256(mirror.files[CLIP]) in message and "\n" not in message
    assert not any(CLIP.split("/")[-1] in name for name in leftovers(cache)), leftovers(cache)
    assert not checkpoint_path(model, cache).exists()


def test_html_page_instead_of_weights(tmp_path, mirror, release):
    model = zoo_model(tmp_path, mirror, release)
    mirror.behaviour[ZUTIS] = Behaviour(html=True)
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match=f"^{mirror.url(ZUTIS)}: the server sent an HTML page") as error:
        fetch_model(model, cache, policy=FAST)
    assert "Sign in" in str(error.value)
    assert leftovers(cache) == []
    assert len(mirror.requests_for(ZUTIS)) == 1  # not retried


def test_truncated_transfer(tmp_path, mirror, release):
    # The server announces the whole length but every response stops at 200 000 bytes: resumed, no progress,
    # bounded retries, then one error.
    model = zoo_model(tmp_path, mirror, release)
    mirror.behaviour[ZUTIS] = Behaviour(truncate_to=200_000)
    cache = tmp_path / "cache"
    with pytest.raises(FetchError) as error:
        fetch_model(model, cache, policy=FAST)
    total = len(mirror.files[ZUTIS])
    assert str(error.value).startswith(f"{mirror.url(ZUTIS)}: truncated: the connection closed after 200000 of "
                                       f"{total} bytes (gave up after 3 attempts without progress")
    assert len(mirror.requests_for(ZUTIS)) == 1 + FAST.retries + 1
    assert leftovers(cache) == []


def test_truncated_file_served_whole(tmp_path, mirror, release):
    # A mirror holding a cut copy (consistent Content-Length), no published hash: the file is not weights.
    model = zoo_model(tmp_path, mirror, release)
    mirror.files[ZUTIS] = mirror.files[ZUTIS][:150_000]
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match=f"^{mirror.url(ZUTIS)}: not a usable ZUTIS weights file .*the file was "
                                         f"deleted$"):
        fetch_model(model, cache, policy=FAST)
    assert leftovers(cache) == []
    assert mirror.requests_for(CLIP) == []  # failed before the second download


def test_size_mismatch_with_the_manifest(tmp_path, mirror, release):
    size = Path(release["clip_path"]).stat().st_size
    model = zoo_model(tmp_path, mirror, release,
                      clip={"url": mirror.url(CLIP), "sha256": None, "size": size + 1})
    with pytest.raises(FetchError, match=f"^{mirror.url(CLIP)}: the server announces {size} bytes, the manifest "
                                         f"says {size + 1}$"):
        fetch_model(model, tmp_path / "cache", policy=FAST)
    assert not any("ViT-tiny" in name for name in leftovers(tmp_path / "cache"))


def test_wrong_architecture(tmp_path, mirror, release):
    model = zoo_model(tmp_path, mirror, release, architecture="ViT-B-16")
    path = tmp_path / "b32.pt"
    torch.save({"encoder.conv1.weight": torch.zeros(768, 3, 32, 32)}, path)
    mirror.files[ZUTIS] = path.read_bytes()
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match=f"^{mirror.url(ZUTIS)}: not a usable ZUTIS weights file \\(wrong "
                                         f"architecture: the file is a ViT-B-32 model .*, the manifest says "
                                         f"ViT-B-16\\)"):
        fetch_model(model, cache, policy=FAST)
    assert leftovers(cache) == []


def test_clip_file_of_the_wrong_architecture(tmp_path, mirror, release):
    from tests.model.official_reference import TINY_CLIP, random_openai_clip_state_dict

    model = zoo_model(tmp_path, mirror, release, clip={"url": mirror.url(CLIP), "sha256": None})
    path = tmp_path / "other.pt"
    torch.save(random_openai_clip_state_dict(**{**TINY_CLIP, "patch": 16, "grid": 4}, seed=2), path)
    mirror.files[CLIP] = path.read_bytes()
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match=f"^{mirror.url(CLIP)}: .* is not CLIP of the configured architecture "
                                         f"weights: .*the file was deleted$") as error:
        fetch_model(model, cache, policy=FAST)
    assert "\n" not in str(error.value)
    assert not any("ViT-tiny" in name for name in leftovers(cache))
    assert not checkpoint_path(model, cache).exists()


def test_http_error_is_not_retried_but_5xx_is(tmp_path, mirror, release):
    model = zoo_model(tmp_path, mirror, release)
    mirror.behaviour[ZUTIS] = Behaviour(status=404)
    with pytest.raises(FetchError, match=f"^{mirror.url(ZUTIS)}: HTTP 404 Not Found$"):
        fetch_model(model, tmp_path / "cache", policy=FAST)
    assert len(mirror.requests_for(ZUTIS)) == 1
    mirror.behaviour[ZUTIS] = Behaviour(status=503)
    with pytest.raises(FetchError, match="HTTP 503 Service Unavailable \\(gave up after 3 attempts"):
        fetch_model(model, tmp_path / "cache", policy=FAST)
    assert len(mirror.requests_for(ZUTIS)) == 1 + 3


def test_unreachable_host_times_out_with_bounded_retries(tmp_path):
    import socket

    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.pt"
        policy = DownloadPolicy(timeout_s=0.3, retries=1, backoff_s=0.01, progress="none")
        with pytest.raises(FetchError, match=f"^{url}: ReadTimeout.*gave up after 2 attempts"):
            download(RemoteFile(url), tmp_path / "x.pt", policy)
    assert not (tmp_path / "x.pt").exists()


def test_a_cache_that_cannot_be_written_is_one_error(tmp_path, mirror, release):
    model = zoo_model(tmp_path, mirror, release)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache should be")
    with pytest.raises(FetchError, match=f"^tiny-coco: cannot write {blocker}.*: .*the cache is ZUTIS_CACHE_DIR"):
        fetch_model(model, blocker / "cache", policy=FAST)
    assert mirror.requests == []


# -- concurrency -----------------------------------------------------------------------------------------------


@pytest.mark.slow  # two fresh interpreters import torch
def test_two_processes_fetching_at_once_download_once(tmp_path, mirror, release):
    manifest = write_manifest(tmp_path / "zoo.json", {"tiny-coco": publish_tiny_release(mirror, release)})
    gate = threading.Event()
    mirror.behaviour[ZUTIS] = Behaviour(gate=gate)  # the first download waits until the second process waits too
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZUTIS_") and "proxy" not in k.lower()}
    env.update(ZUTIS_ZOO_MANIFEST=str(manifest), ZUTIS_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "model.fetch", "tiny-coco", "--progress", "log"]
    logs = [tmp_path / f"fetch-{i}.log" for i in range(2)]
    processes = []
    try:
        for log in logs:
            with open(log, "w") as err:
                processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, env=env,
                                                  cwd=REPO_ROOT, text=True))
        end = time.monotonic() + 120
        waiting = "tiny-coco: another process is fetching it; waiting"
        while not any(waiting in log.read_text() for log in logs) and time.monotonic() < end:
            assert all(p.poll() is None for p in processes), [log.read_text() for log in logs]
            time.sleep(0.1)
        gate.set()
        outputs = [p.communicate(timeout=120)[0] for p in processes]
    finally:
        gate.set()
        for p in processes:
            if p.poll() is None:
                p.kill()
    texts = [log.read_text() for log in logs]
    assert [p.returncode for p in processes] == [0, 0], texts
    assert sum(waiting in text for text in texts) == 1, texts  # one waited on the other's lock...
    assert sum("converted by another process meanwhile" in text for text in texts) == 1, texts  # ...and found it
    paths = {out.strip() for out in outputs}
    assert len(paths) == 1 and Path(paths.pop()).is_file()
    assert mirror.full_downloads(ZUTIS) == 1 and mirror.full_downloads(CLIP) == 1
    assert len(mirror.requests_for(ZUTIS)) == 1


# -- the command line --------------------------------------------------------------------------------------------


def test_cli_by_name_prints_the_path_and_hits_the_cache(tmp_path, mirror, release, capsys, monkeypatch):
    manifest = write_manifest(tmp_path / "zoo.json", {"tiny-coco": publish_tiny_release(mirror, release)})
    monkeypatch.setenv("ZUTIS_ZOO_MANIFEST", str(manifest))
    monkeypatch.setenv("ZUTIS_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["tiny-coco", "--progress", "none"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.is_file() and path.is_relative_to(tmp_path / "cache")
    requests = len(mirror.requests)
    assert main(["zoo:tiny-coco"]) == 0
    assert Path(capsys.readouterr().out.strip()) == path and len(mirror.requests) == requests
    assert read_metadata(path).provenance["command"] == "python -m model.fetch tiny-coco --progress none"


def test_cli_explicit_urls(tmp_path, mirror, release, capsys):
    publish_tiny_release(mirror, release)
    out = tmp_path / "x.safetensors"
    common = ["--zutis-url", mirror.url(ZUTIS), "--clip-url", mirror.url(CLIP), "--vocabulary", "coco",
              "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--progress", "none"]
    # The tiny architecture is no official one: without --arch it cannot be inferred, and the error says why.
    assert main(common) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {mirror.url(ZUTIS)}: not a usable ZUTIS weights file (encoder.conv1.weight "
                          f"has patch size 8") and err.count("\n") == 1
    assert not out.exists()
    # With the architecture as a JSON file of ModelConfig fields and the CLIP hash checked, it converts.
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_test_config().to_dict()))
    clip_sha = sha256(mirror.files[CLIP])
    assert main([*common, "--arch", str(config), "--clip-sha256", clip_sha]) == 0
    assert Path(capsys.readouterr().out.strip()) == out
    prov = read_metadata(out).provenance
    assert prov["zoo_model"] == "custom" and prov["clip_sha256"] == clip_sha and prov["clip_sha256_verified"]
    assert read_metadata(out).input_size == 640
    model = explicit_model(mirror.url(ZUTIS), mirror.url(CLIP), "imagenet_s919")
    assert model.name == "custom" and model.input_size == 1024  # the official protocol's cap for ImageNet-S


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ZUTIS_ZOO_MANIFEST", raising=False)
    assert main(["no-such-model", "--cache-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown zoo model 'no-such-model' in the built-in zoo; known: coca-vit-b16, "
                          "coco-vit-b16, imagenet-s919-vit-b16, imagenet-s919-vit-b32")
    assert main(["--zutis-url", "ftp://x/y.pt", "--clip-url", "https://x/c.pt", "--vocabulary", "coco",
                 "--cache-dir", str(tmp_path)]) == 1
    assert "--zutis-url.url: expected an http(s) URL" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["coco-vit-b16", "--zutis-url", "https://x/y.pt"])
    assert main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert "coco-vit-b16\tcoco\tViT-B-16\tCOCO-20K instances mask AP 5.7" in listing


def test_a_server_that_compresses_anyway_gives_the_file_itself(tmp_path, mirror):
    data = bytes(range(256)) * 2000
    mirror.files["g.bin"] = data
    mirror.behaviour["g.bin"] = Behaviour(gzip=True)
    got = download(RemoteFile(mirror.url("g.bin"), sha256(data)), tmp_path / "g.bin", FAST)
    assert got.size == len(data) and (tmp_path / "g.bin").read_bytes() == data


def test_progress_bar_on_request(tmp_path, mirror, capsys):
    mirror.files["f.bin"] = os.urandom(300_000)
    policy = DownloadPolicy(timeout_s=5, retries=0, progress="bar")
    download(RemoteFile(mirror.url("f.bin")), tmp_path / "f.bin", policy)
    err = capsys.readouterr().err
    assert "f.bin" in err and "100%" in err
