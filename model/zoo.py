"""The model zoo: named official models, each a ZUTIS release file plus the OpenAI CLIP file it needs.

The manifest is JSON (``model/zoo.json`` in the package; a file of the same schema replaces it, e.g. for an
air-gapped mirror or private models)::

    {"models": {"coco-vit-b16": {
        "zutis": {"url": "https://.../coco_vit_b_16.pt", "sha256": null, "size": null},
        "clip": {"url": "https://.../ViT-B-16.pt", "sha256": "5806e77c...", "size": null},
        "vocabulary": "coco",
        "architecture": "ViT-B-16",     # optional: inferred from the weights (patch size); or ModelConfig fields
        "geometry": "native",           # optional: the official protocol's, native
        "input_size": 640,              # optional: the official protocol's, 640 (COCO, CoCA) or 1024 (ImageNet-S)
        "description": "...", "paper": [{"benchmark": "...", "metric": "...", "value": 5.7}]}}}

Where the built-in entries come from (cited in ``zoo.json``'s ``sources``): the ZUTIS files are the ones the
official README (github.com/NoelShin/zutis) links under ``https://www.robots.ox.ac.uk/~vgg/research/zutis/
shared_files/``, with no published checksum (``sha256: null``: the hash of what was downloaded is still recorded
in the checkpoint's provenance); the CLIP files are OpenAI's (github.com/openai/CLIP, ``clip/clip.py``), whose URL
carries the file's sha256. The paper figures are the README's (reference §6.2).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.config import ModelConfig
from model.convert_official import OFFICIAL_GEOMETRY, OFFICIAL_INPUT_SIZE
from model.geometry import GEOMETRIES
from model.vocabularies import VOCABULARIES

BUILTIN_MANIFEST = Path(__file__).with_name("zoo.json")
ZOO_PREFIX = "zoo:"
OFFICIAL_ARCHITECTURES = ("ViT-B-16", "ViT-B-32")
DEFAULT_GEOMETRY = OFFICIAL_GEOMETRY  # the official protocol's (model.convert_official)
DEFAULT_INPUT_SIZE = OFFICIAL_INPUT_SIZE
# The official protocol's longer-side cap (reference §3.6): COCO and CoCA images go in at their own size (640 is
# COCO's longer side), ImageNet-S images are capped at 1024.
OFFICIAL_INPUT_SIZES = {"coco": 640, "coca": 640, "imagenet_s919": 1024}


def official_input_size(vocabulary: str) -> int:
    """The official protocol's longer-side cap for a model trained on ``vocabulary``."""
    return OFFICIAL_INPUT_SIZES.get(vocabulary, DEFAULT_INPUT_SIZE)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_MODEL_KEYS = {"zutis", "clip", "vocabulary", "architecture", "geometry", "input_size", "description", "paper"}
_FILE_KEYS = {"url", "sha256", "size"}


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and the offending field."""


@dataclass(frozen=True)
class RemoteFile:
    """A file to download: its URL, its sha256 (64 lower-case hex digits) when known, its size in bytes if known."""

    url: str
    sha256: str | None = None
    size: int | None = None

    @property
    def name(self) -> str:
        """The file name at the end of the URL's path (``coco_vit_b_16.pt``)."""
        return self.url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "download"


@dataclass(frozen=True)
class PaperFigure:
    """One published result of a model: ``benchmark`` (data set and task), ``metric`` and ``value`` (percent)."""

    benchmark: str
    metric: str
    value: float


@dataclass(frozen=True)
class ZooModel:
    """One manifest entry. ``architecture``: an official name (``ViT-B-16``, ``ViT-B-32``), a ``ModelConfig``
    (private models of another size), or None (inferred from the weights' patch size)."""

    name: str
    zutis: RemoteFile
    clip: RemoteFile
    vocabulary: str
    architecture: str | ModelConfig | None = None
    geometry: str = DEFAULT_GEOMETRY
    input_size: int = DEFAULT_INPUT_SIZE
    description: str = ""
    paper: tuple[PaperFigure, ...] = field(default=())

    def cache_key(self) -> str:
        """sha256 (hex) of everything that determines the converted checkpoint: both files (URL and expected hash),
        the vocabulary, the architecture, the geometry and the input size. Descriptions and figures are not part
        of it: editing them never invalidates a cached checkpoint."""
        arch = self.architecture.to_dict() if isinstance(self.architecture, ModelConfig) else self.architecture
        identity = {"zutis": [self.zutis.url, self.zutis.sha256], "clip": [self.clip.url, self.clip.sha256],
                    "vocabulary": self.vocabulary, "architecture": arch, "geometry": self.geometry,
                    "input_size": self.input_size}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def parse_zoo_reference(value: str) -> str | None:
    """``"zoo:coco-vit-b16"`` -> ``"coco-vit-b16"``; anything else (a file path) -> None."""
    return value[len(ZOO_PREFIX):] if value.startswith(ZOO_PREFIX) else None


def load_manifest(path: str | Path | None = None) -> dict[str, ZooModel]:
    """The models of the manifest at ``path`` (default: the built-in one), by name. ``ManifestError`` names the
    file and the field for anything malformed (unknown keys included, so that a typo never falls back to a
    default)."""
    path = Path(path) if path is not None else BUILTIN_MANIFEST
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"zoo manifest not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"zoo manifest {path}: not readable JSON ({exc})") from None
    where = f"zoo manifest {path}"
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), dict) or not doc["models"]:
        raise ManifestError(f"{where}: expected an object with a non-empty \"models\" object")
    # Other top-level keys ("format", "sources", a mirror's own notes) are metadata and ignored; inside an
    # entry, unknown keys are errors (a misspelt "sha256" must not silently skip the check).
    return {name: _parse_model(name, entry, f"{where}: models.{name}") for name, entry in doc["models"].items()}


def find_model(name: str, manifest_path: str | Path | None = None) -> ZooModel:
    """The entry ``name`` of the manifest; ``ManifestError`` naming the known models when there is none."""
    models = load_manifest(manifest_path)
    if name not in models:
        source = manifest_path or "the built-in zoo"
        raise ManifestError(f"unknown zoo model {name!r} in {source}; known: {', '.join(sorted(models))}")
    return models[name]


def _parse_model(name: str, entry: Any, where: str) -> ZooModel:
    if not _NAME.fullmatch(name):
        raise ManifestError(f"{where}: a name is letters, digits, '.', '_' and '-' (starting with a letter or digit)")
    if not isinstance(entry, dict):
        raise ManifestError(f"{where}: expected an object")
    unknown = set(entry) - _MODEL_KEYS
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_MODEL_KEYS)}")
    for required in ("zutis", "clip", "vocabulary"):
        if required not in entry:
            raise ManifestError(f"{where}: \"{required}\" is required")
    vocabulary = entry["vocabulary"]
    if isinstance(vocabulary, str) and vocabulary.replace("-", "_").lower() in VOCABULARIES:
        vocabulary = vocabulary.replace("-", "_").lower()  # "imagenet-s919", as the model names spell it
    if vocabulary not in VOCABULARIES:
        raise ManifestError(f"{where}.vocabulary: {vocabulary!r} is not one of {list(VOCABULARIES)}")
    geometry = entry.get("geometry", DEFAULT_GEOMETRY)
    if geometry not in GEOMETRIES:
        raise ManifestError(f"{where}.geometry: {geometry!r} is not one of {list(GEOMETRIES)}")
    input_size = entry.get("input_size", official_input_size(vocabulary))
    if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < 8:
        raise ManifestError(f"{where}.input_size: expected an integer >= 8, got {input_size!r}")
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise ManifestError(f"{where}.description: expected a string")
    return ZooModel(name=name, zutis=_parse_file(entry["zutis"], f"{where}.zutis"),
                    clip=_parse_file(entry["clip"], f"{where}.clip"), vocabulary=vocabulary,
                    architecture=_parse_architecture(entry.get("architecture"), f"{where}.architecture"),
                    geometry=geometry, input_size=input_size, description=description,
                    paper=_parse_paper(entry.get("paper", []), f"{where}.paper"))


def parse_remote_file(url: str, sha256: str | None = None, size: int | None = None,
                      where: str = "file") -> RemoteFile:
    """A ``RemoteFile`` checked: an http(s) URL, a 64-hex-digit sha256 (upper case accepted) or None, a size >= 1
    or None. ``ManifestError`` naming ``where`` otherwise."""
    return _parse_file({"url": url, "sha256": sha256, "size": size}, where)


def _parse_file(entry: Any, where: str) -> RemoteFile:
    if not isinstance(entry, dict):
        raise ManifestError(f"{where}: expected an object with \"url\" and \"sha256\"")
    unknown = set(entry) - _FILE_KEYS
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_FILE_KEYS)}")
    url = entry.get("url")
    if not isinstance(url, str) or not re.match(r"https?://[^/\s]+/\S+$", url):
        raise ManifestError(f"{where}.url: expected an http(s) URL of a file, got {url!r}")
    sha256 = entry.get("sha256")
    if sha256 is not None:
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256.lower()):
            raise ManifestError(f"{where}.sha256: expected 64 hexadecimal digits or null, got {sha256!r}")
        sha256 = sha256.lower()
    size = entry.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise ManifestError(f"{where}.size: expected a positive integer (bytes) or null, got {size!r}")
    return RemoteFile(url=url, sha256=sha256, size=size)


def _parse_architecture(value: Any, where: str) -> str | ModelConfig | None:
    if isinstance(value, str) and value.replace("/", "-") in OFFICIAL_ARCHITECTURES:
        return value.replace("/", "-")  # "ViT-B/16", as papers write it
    if value is None:
        return None
    if isinstance(value, dict):
        try:
            return ModelConfig.from_dict(dict(value))
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"{where}: not a valid ModelConfig ({exc})") from None
    raise ManifestError(f"{where}: expected one of {list(OFFICIAL_ARCHITECTURES)}, an object of ModelConfig "
                        f"fields, or null (inferred from the weights); got {value!r}")


def _parse_paper(value: Any, where: str) -> tuple[PaperFigure, ...]:
    if not isinstance(value, list):
        raise ManifestError(f"{where}: expected a list of {{\"benchmark\", \"metric\", \"value\"}}")
    figures = []
    for i, item in enumerate(value):
        if (not isinstance(item, dict) or set(item) != {"benchmark", "metric", "value"}
                or not isinstance(item["benchmark"], str) or not isinstance(item["metric"], str)
                or not isinstance(item["value"], (int, float)) or isinstance(item["value"], bool)):
            raise ManifestError(f"{where}[{i}]: expected {{\"benchmark\": str, \"metric\": str, \"value\": number}}")
        figures.append(PaperFigure(item["benchmark"], item["metric"], float(item["value"])))
    return tuple(figures)
