"""A zoo model (or any pair of official files) from a name to a checkpoint: download, verify, convert, cache.

    python -m model.fetch coco-vit-b16                      # prints the checkpoint's path
    python -m model.fetch coco-vit-b16 --out coco.safetensors
    python -m model.fetch --zutis-url URL --clip-url URL --vocabulary coco [--zutis-sha256 H] [--clip-sha256 H] \\
        --out PATH                                          # any mirror, no manifest
    python -m model.fetch --list

The cache (``--cache-dir``, else ``$ZUTIS_CACHE_DIR``, else ``~/.cache/zutis``) holds the downloads under
``downloads/<host>/<path of the URL>`` and the converted checkpoints under
``checkpoints/<name>-<key>.safetensors``, where the key is a hash of everything the conversion depends on
(``ZooModel.cache_key``). A second call finds the checkpoint and downloads nothing; two processes fetching the
same model at once (two replicas on one host) download and convert it once (file locks). ``$ZUTIS_ZOO_MANIFEST``
(or ``--manifest``) replaces the built-in manifest (``model/zoo.py`` documents the schema).

The checkpoint's provenance records each file's URL and sha256 (verified against the manifest where it gives
one), the zoo name and the cache key. This module is part of the inference library: the service calls
``fetch_model`` at start-up for ``ZUTIS_CHECKPOINT=zoo:NAME``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote, urlsplit

import httpx

from model.checkpoint import read_metadata
from model.config import ModelConfig
from model.convert_official import InputFileError, convert_official, infer_architecture, read_official_state_dict
from model.cache_dir import default_cache_dir
from model.download import Downloaded, DownloadPolicy, FetchError, cache_lock, download, remove_download
from model.vocabularies import VOCABULARIES
from model.zoo import (
    DEFAULT_GEOMETRY,
    OFFICIAL_ARCHITECTURES,
    ManifestError,
    ZooModel,
    find_model,
    load_manifest,
    official_input_size,
    parse_remote_file,
    parse_zoo_reference,
)

log = logging.getLogger("model.fetch")

CUSTOM_NAME = "custom"


@dataclass(frozen=True)
class FetchResult:
    """A fetched model: the checkpoint, the entry it was made from, each input file's sha256 (``zutis``,
    ``clip``), and whether it came from the cache untouched (no download, no conversion)."""

    checkpoint: Path
    model: ZooModel
    sha256: dict[str, str]
    cached: bool


def checkpoint_path(model: ZooModel, cache_dir: Path) -> Path:
    """Where the cache keeps ``model``'s converted checkpoint."""
    return cache_dir / "checkpoints" / f"{model.name}-{model.cache_key()[:12]}.safetensors"


def download_path(url: str, cache_dir: Path) -> Path:
    """Where the cache keeps the download of ``url``: ``downloads/<host>/<path>`` (readable; one copy per URL)."""
    parts = urlsplit(url)
    segments = [s for s in unquote(parts.path).split("/") if s not in ("", ".", "..")] or ["download"]
    host = (parts.hostname or "host") + (f"_{parts.port}" if parts.port else "")
    if parts.query:  # a signed or versioned URL: keep two queries apart
        segments[-1] += "-" + hashlib.sha256(parts.query.encode()).hexdigest()[:12]
    return cache_dir.joinpath("downloads", host, *segments)


def find_cached(model: ZooModel, out: Path) -> bool:
    """Whether ``out`` is a checkpoint converted from exactly this entry (reads its header only; no writes)."""
    if not out.is_file():
        return False
    try:
        provenance = read_metadata(out).provenance
    except (ValueError, OSError):
        return False
    return provenance.get("zoo_key") == model.cache_key()


def fetch_model(model: ZooModel, cache_dir: str | Path, out: str | Path | None = None,
                policy: DownloadPolicy = DownloadPolicy(), client: httpx.Client | None = None,
                command: str | None = None) -> FetchResult:
    """``model`` as a checkpoint in our format: found in the cache, or downloaded, verified and converted.

    Args:
        model: the manifest entry (``model.zoo.find_model``).
        cache_dir: the cache folder (created when needed; a cache hit writes nothing, so it may be read-only).
        out: where to write the checkpoint; default ``checkpoint_path(model, cache_dir)``.
        policy: timeouts, retries and progress of the downloads.
        client: the ``httpx.Client`` to download with (default: one per file).
        command: recorded in the provenance (default: this process's command line).

    Raises ``FetchError`` (one line naming the URL and what was wrong) and leaves no unusable file behind.
    """
    cache_dir = Path(cache_dir).expanduser()
    out = Path(out) if out is not None else checkpoint_path(model, cache_dir)
    if find_cached(model, out):
        log.info("%s: found in the cache, %s", model.name, out)
        return FetchResult(out, model, _recorded_hashes(out), cached=True)
    lock = cache_dir / "locks" / (hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16] + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        with cache_lock(lock, policy.lock_timeout_s, model.name):
            if find_cached(model, out):  # another process converted it while this one waited
                log.info("%s: converted by another process meanwhile, %s", model.name, out)
                return FetchResult(out, model, _recorded_hashes(out), cached=True)
            zutis = download(model.zutis, download_path(model.zutis.url, cache_dir), policy, client)
            _check_zutis_file(model, zutis)
            clip = download(model.clip, download_path(model.clip.url, cache_dir), policy, client)
            _convert(model, zutis, clip, out, command)
    except OSError as exc:  # a cache that cannot be written, a full disk: one line, as for a download error
        where = exc.filename or cache_dir
        raise FetchError(f"{model.name}: cannot write {where}: {exc.strerror or exc} (the cache is ZUTIS_CACHE_DIR "
                         f"or --cache-dir; it needs about 1.6 GB per model)") from None
    return FetchResult(out, model, {"zutis": zutis.sha256, "clip": clip.sha256}, cached=False)


def _check_zutis_file(model: ZooModel, zutis: Downloaded) -> None:
    """Before downloading CLIP: the ZUTIS file is a state dict of the manifest's architecture, or of an official
    one when the manifest names none (read lazily with ``mmap``: only ``encoder.conv1.weight`` is touched). An
    unusable file is deleted."""
    try:
        state = read_official_state_dict(zutis.path, mmap=True)
        if not isinstance(model.architecture, ModelConfig):  # official: named, or inferred from the patch size
            found = infer_architecture(state)
            if model.architecture is not None and found != model.architecture:
                raise ValueError(f"wrong architecture: the file is a {found} model (patch size of "
                                 f"encoder.conv1.weight), the manifest says {model.architecture}")
    except Exception as exc:  # noqa: BLE001 - a truncated zip, a pickle with objects, a wrong layout...
        remove_download(zutis.path)
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FetchError(f"{model.zutis.url}: not a usable ZUTIS weights file ({problem}); the file was "
                         f"deleted") from None


def _convert(model: ZooModel, zutis: Downloaded, clip: Downloaded, out: Path, command: str | None) -> None:
    """``convert_official`` on the two files; a file it rejects is deleted and named by its URL."""
    arch = model.architecture if isinstance(model.architecture, str) else None
    config = model.architecture if isinstance(model.architecture, ModelConfig) else None
    extra = {"zoo_model": model.name, "zoo_key": model.cache_key(), "zutis_url": model.zutis.url,
             "zutis_sha256": zutis.sha256, "zutis_sha256_verified": model.zutis.sha256 is not None,
             "clip_url": model.clip.url, "clip_sha256": clip.sha256,
             "clip_sha256_verified": model.clip.sha256 is not None}
    log.info("%s: converting (%s + %s)", model.name, zutis.path.name, clip.path.name)
    try:
        convert_official(zutis.path, clip.path, model.vocabulary, out, arch=arch, model_config=config,
                         command=command, input_size=model.input_size, geometry=model.geometry,
                         extra_provenance=extra)
    except InputFileError as exc:
        culprit, url = (zutis, model.zutis.url) if exc.path == zutis.path else (clip, model.clip.url)
        remove_download(culprit.path)
        raise FetchError(f"{url}: {_one_line(exc)}; the file was deleted") from None
    log.info("%s: wrote %s", model.name, out)


def _recorded_hashes(out: Path) -> dict[str, str]:
    provenance = read_metadata(out).provenance
    return {"zutis": str(provenance.get("zutis_sha256")), "clip": str(provenance.get("clip_sha256"))}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def explicit_model(zutis_url: str, clip_url: str, vocabulary: str, zutis_sha256: str | None = None,
                   clip_sha256: str | None = None, architecture: str | ModelConfig | None = None,
                   input_size: int | None = None, geometry: str = DEFAULT_GEOMETRY) -> ZooModel:
    """A ``ZooModel`` named ``custom`` from explicit URLs (the command's mirror form); ``ManifestError`` for a bad
    URL or hash. ``input_size`` defaults to the official protocol's for the vocabulary."""
    return ZooModel(name=CUSTOM_NAME, zutis=parse_remote_file(zutis_url, zutis_sha256, where="--zutis-url"),
                    clip=parse_remote_file(clip_url, clip_sha256, where="--clip-url"), vocabulary=vocabulary,
                    architecture=architecture, geometry=geometry,
                    input_size=input_size if input_size is not None else official_input_size(vocabulary))


def _architecture_argument(value: str | None) -> str | ModelConfig | None:
    """``--arch``: an official name, or a JSON file of ``ModelConfig`` fields (a private model of another size)."""
    if value is None or value.replace("/", "-") in OFFICIAL_ARCHITECTURES:
        return None if value is None else value.replace("/", "-")
    try:
        return ModelConfig.from_dict(json.loads(Path(value).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        raise ManifestError(f"--arch {value}: neither {' nor '.join(OFFICIAL_ARCHITECTURES)} nor a readable JSON "
                            f"file of ModelConfig fields ({exc})") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model.fetch", description=__doc__.split("\n\n")[0],
                                     epilog="The checkpoint's path is printed on stdout; progress goes to stderr.")
    parser.add_argument("name", nargs="?", help="a zoo model (coco-vit-b16, ...; 'zoo:' prefix allowed)")
    parser.add_argument("--out", type=Path, help="write the checkpoint here (default: into the cache)")
    parser.add_argument("--cache-dir", type=Path, help="default: $ZUTIS_CACHE_DIR, else ~/.cache/zutis")
    parser.add_argument("--manifest", type=Path, help="zoo manifest (default: $ZUTIS_ZOO_MANIFEST, else built-in)")
    parser.add_argument("--list", action="store_true", help="list the manifest's models and exit")
    explicit = parser.add_argument_group("explicit files (instead of a name)")
    explicit.add_argument("--zutis-url", help="URL of an official ZUTIS release file")
    explicit.add_argument("--clip-url", help="URL of the OpenAI CLIP file of the same architecture")
    explicit.add_argument("--vocabulary", choices=VOCABULARIES)
    explicit.add_argument("--zutis-sha256", help="expected sha256 of the ZUTIS file (checked when given)")
    explicit.add_argument("--clip-sha256", help="expected sha256 of the CLIP file (checked when given)")
    explicit.add_argument("--arch", help="ViT-B-16, ViT-B-32, or a JSON file of ModelConfig fields; default: "
                                         "inferred from the weights")
    explicit.add_argument("--input-size", type=int, help="longer-side cap stored in the checkpoint (default: the "
                                                         "official protocol's, 640; ImageNet-S 1024)")
    download_ = parser.add_argument_group("downloads")
    download_.add_argument("--timeout", type=float, default=DownloadPolicy.timeout_s, help="seconds per read")
    download_.add_argument("--retries", type=int, default=DownloadPolicy.retries,
                           help="attempts in a row without progress before giving up")
    download_.add_argument("--progress", choices=["auto", "bar", "log", "none"], default="auto",
                           help="auto: a bar on a terminal, log lines otherwise")
    return parser


def _resolve_model(args: argparse.Namespace, parser: argparse.ArgumentParser, manifest: Path | None) -> ZooModel:
    explicit = [args.zutis_url, args.clip_url, args.vocabulary]
    if args.name and any(explicit):
        parser.error("give a zoo name or --zutis-url/--clip-url/--vocabulary, not both")
    if args.name:
        name = parse_zoo_reference(args.name) or args.name
        return find_model(name, manifest)
    if not all(explicit):
        parser.error("give a zoo name (see --list), or all of --zutis-url, --clip-url and --vocabulary")
    if args.input_size is not None and args.input_size < 8:
        parser.error("--input-size must be at least 8")
    return explicit_model(args.zutis_url, args.clip_url, args.vocabulary, args.zutis_sha256, args.clip_sha256,
                          _architecture_argument(args.arch), args.input_size)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # The command line's own defaults; the service passes its settings instead (service.settings).
    manifest = args.manifest or (Path(os.environ["ZUTIS_ZOO_MANIFEST"]) if os.environ.get("ZUTIS_ZOO_MANIFEST")
                                 else None)
    cache_dir = args.cache_dir or default_cache_dir()
    if args.timeout <= 0 or args.retries < 0:
        parser.error("--timeout must be positive and --retries at least 0")
    try:
        if args.list:
            for name, model in sorted(load_manifest(manifest).items()):
                figures = ", ".join(f"{f.benchmark} {f.metric} {f.value:g}" for f in model.paper)
                print(f"{name}\t{model.vocabulary}\t{model.architecture or 'inferred'}\t{figures}")
            return 0
        model = _resolve_model(args, parser, manifest)
        command = shlex.join(["python", "-m", "model.fetch", *(sys.argv[1:] if argv is None else list(argv))])
        policy = DownloadPolicy(timeout_s=args.timeout, retries=args.retries, progress=args.progress)
        result = fetch_model(model, cache_dir, args.out, policy, command=command)
    except (FetchError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result.checkpoint)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
