"""The zoo manifest: the built-in entries are the official files (URLs, hashes, figures), a replacement manifest is
validated field by field with errors that name the field, and the README's zoo table says what the manifest says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from model.config import tiny_test_config
from model.zoo import BUILTIN_MANIFEST, ManifestError, ZooModel, find_model, load_manifest, parse_zoo_reference

ROOT = Path(__file__).resolve().parents[2]
ZUTIS_HOST = "https://www.robots.ox.ac.uk/~vgg/research/zutis/shared_files/"
CLIP_B16 = ("https://openaipublic.azureedge.net/clip/models/"
            "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt")
CLIP_B32 = ("https://openaipublic.azureedge.net/clip/models/"
            "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt")


def test_builtin_manifest_holds_the_official_files():
    models = load_manifest()
    assert sorted(models) == ["coca-vit-b16", "coco-vit-b16", "imagenet-s919-vit-b16", "imagenet-s919-vit-b32"]
    expected = {
        "coco-vit-b16": ("coco2017/coco_vit_b_16.pt", CLIP_B16, "coco", "ViT-B-16", 640),
        "coca-vit-b16": ("coca/coca_vit_b_16.pt", CLIP_B16, "coca", "ViT-B-16", 640),
        "imagenet-s919-vit-b16": ("imagenet-s919/imagenet_s919_vit_b_16.pt", CLIP_B16, "imagenet_s919", "ViT-B-16",
                                  1024),
        "imagenet-s919-vit-b32": ("imagenet-s919/imagenet_s919_vit_b_32.pt", CLIP_B32, "imagenet_s919", "ViT-B-32",
                                  1024),
    }
    for name, (zutis, clip, vocabulary, arch, size) in expected.items():
        model = models[name]
        assert model.zutis.url == ZUTIS_HOST + zutis and model.zutis.sha256 is None  # none published
        assert model.clip.url == clip
        assert model.clip.sha256 == clip.split("/")[-2]  # OpenAI's URL carries the file's sha256
        assert (model.vocabulary, model.architecture, model.geometry, model.input_size) == (vocabulary, arch,
                                                                                          "native", size)
    figures = {name: {(f.benchmark, f.metric): f.value for f in m.paper} for name, m in models.items()}
    assert figures["coco-vit-b16"] == {("COCO-20K instances", "mask AP"): 5.7,
                                       ("COCO-20K instances", "mask AP50"): 11.0,
                                       ("COCO-20K instances", "mask AP75"): 5.4,
                                       ("COCO2017 val semantic", "mIoU"): 32.8}
    assert figures["coca-vit-b16"] == {("CoCA semantic", "mIoU"): 32.7}
    assert figures["imagenet-s919-vit-b16"] == {("ImageNet-S919 test semantic", "mIoU"): 37.4}
    assert figures["imagenet-s919-vit-b32"] == {("ImageNet-S919 test semantic", "mIoU"): 27.5}


def test_builtin_manifest_is_package_data():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"zoo.json"' in re.search(r"^model = \[.*\]$", pyproject, re.M).group(0)
    assert BUILTIN_MANIFEST.is_file()


def test_zoo_reference():
    assert parse_zoo_reference("zoo:coco-vit-b16") == "coco-vit-b16"
    assert parse_zoo_reference("weights/zutis-shapes.safetensors") is None


def write(tmp_path, doc) -> Path:
    path = tmp_path / "zoo.json"
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


def minimal(**entry) -> dict:
    base = {"zutis": {"url": "https://mirror.example/z.pt", "sha256": None},
            "clip": {"url": "https://mirror.example/c.pt", "sha256": "AB" * 32}, "vocabulary": "coco"}
    base.update(entry)
    return {"models": {"m": base}}


def test_minimal_entry_gets_the_official_defaults(tmp_path):
    model = find_model("m", write(tmp_path, minimal()))
    assert model == ZooModel(name="m", zutis=model.zutis, clip=model.clip, vocabulary="coco")
    assert (model.architecture, model.geometry, model.input_size, model.paper) == (None, "native", 640, ())
    assert model.clip.sha256 == "ab" * 32  # normalised to lower case
    spelled = find_model("m", write(tmp_path, {**minimal(vocabulary="imagenet-s919", architecture="ViT-B/32"),
                                               "version": 1}))  # other top-level keys are metadata
    assert (spelled.vocabulary, spelled.architecture) == ("imagenet_s919", "ViT-B-32")
    assert spelled.input_size == 1024  # the official protocol's cap for ImageNet-S when none is given
    custom = find_model("m", write(tmp_path, minimal(architecture=tiny_test_config().to_dict())))
    assert custom.architecture == tiny_test_config()


@pytest.mark.parametrize("doc, message", [
    ("{not json", "not readable JSON"),
    ({"model": {}}, "expected an object with a non-empty \"models\" object"),
    ({"models": {}, "format": "zutis-zoo/1"}, "expected an object with a non-empty"),
    (minimal(zutis={"url": "https://mirror.example/z.pt", "sha": None}), "models.m.zutis: unknown key\\(s\\) \\['sha'\\]"),
    (minimal(zutis={"url": "ftp://mirror.example/z.pt"}), "models.m.zutis.url: expected an http\\(s\\) URL"),
    (minimal(clip={"url": "https://mirror.example/c.pt", "sha256": "abc"}),
     "models.m.clip.sha256: expected 64 hexadecimal digits or null, got 'abc'"),
    (minimal(clip={"url": "https://mirror.example/c.pt", "size": -1}), "models.m.clip.size: expected a positive"),
    (minimal(vocabulary="voc"), "models.m.vocabulary: 'voc' is not one of \\['coco', 'coca', 'imagenet_s919'\\]"),
    (minimal(architecture="ViT-L-14"), "models.m.architecture: expected one of \\['ViT-B-16', 'ViT-B-32'\\]"),
    (minimal(architecture={"num_querys": 3}), "models.m.architecture: not a valid ModelConfig"),
    (minimal(geometry="square"), "models.m.geometry: 'square' is not one of"),
    (minimal(input_size=4), "models.m.input_size: expected an integer >= 8"),
    (minimal(paper=[{"benchmark": "x", "value": 1}]), "models.m.paper\\[0\\]: expected"),
    (minimal(checksum="x"), "models.m: unknown key\\(s\\) \\['checksum'\\]"),
    ({"models": {"m": {"zutis": {"url": "https://x/z.pt"}, "vocabulary": "coco"}}}, "models.m: \"clip\" is required"),
    ({"models": {"bad name": minimal()["models"]["m"]}}, "models.bad name: a name is"),
])
def test_schema_errors_name_the_file_and_the_field(tmp_path, doc, message):
    path = write(tmp_path, doc)
    with pytest.raises(ManifestError, match=message) as error:
        load_manifest(path)
    assert str(error.value).startswith(f"zoo manifest {path}")


def test_unknown_name_and_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="unknown zoo model 'coco' in the built-in zoo; known: coca-vit-b16, "
                                            "coco-vit-b16, imagenet-s919-vit-b16, imagenet-s919-vit-b32"):
        find_model("coco")
    with pytest.raises(ManifestError, match="zoo manifest not found: .*nope.json"):
        find_model("m", tmp_path / "nope.json")


def test_cache_key_follows_what_the_conversion_depends_on(tmp_path):
    base = find_model("m", write(tmp_path, minimal()))
    same = find_model("m", write(tmp_path, minimal(description="words", paper=[])))
    assert same.cache_key() == base.cache_key()
    for change in (dict(input_size=1024), dict(vocabulary="coca"), dict(architecture="ViT-B-32"),
                   dict(zutis={"url": "https://mirror.example/other.pt"}),
                   dict(clip={"url": "https://mirror.example/c.pt", "sha256": "cd" * 32})):
        assert find_model("m", write(tmp_path, minimal(**change))).cache_key() != base.cache_key(), change


def test_readme_zoo_table_matches_the_manifest():
    readme = (ROOT / "README.md").read_text()
    for name, model in load_manifest().items():
        rows = [line for line in readme.splitlines() if line.startswith(f"| `{name}` |")]
        assert len(rows) == 1, f"README.md: no zoo table row for {name}"
        row = rows[0]
        assert f"{model.input_size}" in row and model.architecture.replace("ViT-B-", "ViT-B/") in row, row
        for figure in model.paper:
            assert f"{figure.value:g}" in row, (name, figure)
    assert "python -m model.fetch coco-vit-b16" in readme and "ZUTIS_CHECKPOINT=zoo:coco-vit-b16" in readme
