"""model.index: image listing, CLIP preprocessing, the sharded resumable index and its loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model.backbone import build_text_tower, build_vision_tower
from model.clip_weights import ClipTowers, save_clip
from model.config import tiny_test_config
from model.training.index import (ImagePreprocess, build_index, list_images, load_index, main, read_manifest,
                         tower_checksum)


def tiny_clip(seed: int = 0) -> ClipTowers:
    torch.manual_seed(seed)
    config = tiny_test_config()
    return ClipTowers(config, build_vision_tower(config).eval(), build_text_tower(config).eval())


def write_images(root: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` random RGB images of varied sizes and formats, spread over two nested folders."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        folder = root / ("a" if i % 2 else "b") / ("deep" if i % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        ext = (".png", ".jpg", ".PNG", ".bmp", ".webp")[i % 5]
        path = folder / f"img{i:03d}{ext}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def clip() -> ClipTowers:
    return tiny_clip()


def test_list_images_recursive_sorted_and_filtered(tmp_path):
    write_images(tmp_path, 6)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    paths = list_images([tmp_path])
    expected = sorted(str(p) for p in tmp_path.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".bmp", ".webp"})
    assert sorted(paths) == expected and len(paths) == 6
    assert paths == list_images([tmp_path])
    # Directories are walked in sorted order: everything under a/ precedes b/.
    assert [Path(p).relative_to(tmp_path).parts[0] for p in paths] == ["a"] * 3 + ["b"] * 3
    assert all(Path(p).is_absolute() for p in paths)


def test_list_images_missing_or_empty_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        list_images([tmp_path / "empty"])
    with pytest.raises(ValueError):
        list_images([])


@pytest.mark.parametrize("size_wh", [(97, 61), (50, 120), (64, 64), (33, 33)])
def test_preprocess_matches_open_clip_transform(size_wh):
    from open_clip.transform import image_transform

    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (size_wh[1], size_wh[0], 3), dtype=np.uint8))
    reference = image_transform(64, is_train=False)(image)
    ours = ImagePreprocess(64)(image)
    assert ours.shape == (3, 64, 64)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_build_index_stores_normalised_embeddings_and_skips_unreadable(tmp_path, clip, caplog):
    images = tmp_path / "images"
    write_images(images, 7)
    broken = images / "a" / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg")
    out = build_index([images], clip, tmp_path / "index", batch_size=3, shard_size=4, progress=False)

    manifest = read_manifest(out)
    assert manifest["count"] == 7 and manifest["dim"] == 32 and manifest["dtype"] == "float16"
    assert [s["embeddings"] for s in manifest["shards"]] == ["embeddings-00000.npy", "embeddings-00001.npy"]
    assert [s["path"] for s in manifest["skipped"]] == [str(broken)]
    assert "broken.jpg" in caplog.text
    embeddings, paths = load_index(out)
    assert embeddings.dtype == np.float16 and embeddings.shape == (7, 32)
    assert paths == [p for p in list_images([images]) if p != str(broken)]
    # Independent reference: one image at a time through the tower, normalised.
    preprocess = ImagePreprocess(64)
    with torch.no_grad():
        for row, path in zip(embeddings, paths):
            expected = F.normalize(clip.visual(preprocess(Image.open(path))[None]), dim=-1)[0]
            np.testing.assert_allclose(row.astype(np.float32), expected.numpy(), atol=2e-3)


def test_build_index_resumes_after_a_crash(tmp_path, clip, monkeypatch):
    images = tmp_path / "images"
    write_images(images, 10)
    reference = build_index([images], clip, tmp_path / "clean", batch_size=2, shard_size=4, progress=False)

    original_forward = clip.visual.forward
    seen = {"images": 0, "calls": 0}

    def crashing_forward(x):
        seen["calls"] += 1
        if seen["calls"] == 4:  # shard 0 took two batches; die inside shard 1
            raise RuntimeError("simulated crash")
        seen["images"] += x.shape[0]
        return original_forward(x)

    monkeypatch.setattr(clip.visual, "forward", crashing_forward)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_index([images], clip, out, batch_size=2, shard_size=4, progress=False)
    assert (out / "shard-00000.json").is_file() and not (out / "shard-00001.json").exists()
    assert not (out / "manifest.json").exists()

    seen.update(images=0, calls=-100)  # no more crashes; count what the second run embeds
    build_index([images], clip, out, batch_size=2, shard_size=4, progress=False)
    assert seen["images"] == 10 - 4

    a, pa = load_index(reference)
    b, pb = load_index(out)
    assert pa == pb and np.array_equal(a, b)
    assert read_manifest(out) == read_manifest(reference)


def test_build_index_refuses_to_mix_settings(tmp_path, clip):
    images = tmp_path / "images"
    write_images(images, 5)
    out = build_index([images], clip, tmp_path / "index", shard_size=4, progress=False)
    with pytest.raises(ValueError, match="new output directory"):
        build_index([images], tiny_clip(seed=1), out, shard_size=4, progress=False)
    with pytest.raises(ValueError, match="new output directory"):
        build_index([images], clip, out, shard_size=4, image_size=48, progress=False)


def test_load_index_single_shard_is_memory_mapped(tmp_path, clip):
    images = tmp_path / "images"
    write_images(images, 3)
    embeddings, paths = load_index(build_index([images], clip, tmp_path / "index", progress=False))
    assert isinstance(embeddings, np.memmap) and len(paths) == 3
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_index(tmp_path / "images")


def test_tower_checksum_identifies_weights_across_fp16(clip):
    base = tower_checksum(clip.visual)
    assert tower_checksum(tiny_clip().visual) == base
    assert tower_checksum(tiny_clip(seed=1).visual) != base
    half = tiny_clip().visual.half()
    assert tower_checksum(half) == base


def test_cli_builds_an_index_and_names_a_missing_weights_file(tmp_path, clip, capsys):
    images = tmp_path / "images"
    write_images(images, 4)
    weights = tmp_path / "tiny-clip.safetensors"
    save_clip(weights, clip)
    argv = ["--images", str(images), "--out", str(tmp_path / "index"), "--clip", str(weights), "--device", "cpu",
            "--num-workers", "0", "--no-progress"]
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["count"] == 4 and manifest["model_id"] == "tiny-clip.safetensors"
    assert manifest["model_checksum"] == tower_checksum(clip.visual)
    assert "indexed 4 images" in capsys.readouterr().out

    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        main(["--images", str(images), "--out", str(tmp_path / "x"), "--clip", str(missing)])
