"""The pseudo-mask stage over many images (``generate_pseudo_masks``) and its on-disk format (``load_pseudo_masks``).

Output directory: ``masks-00000.json``... shards, each ``{"format", "settings", "masks": {path: COCO RLE},
"failed": {path: reason}}``, written atomically. Reruns skip images already in a shard (resume, and incremental
when more images are added); shards made with other settings are an error. Masks are in the pixel grid of
``PIL.Image.open(path).convert("RGB")`` (no EXIF rotation), at the image's full resolution.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from model.rle import encode_masks
from model.training.files import write_json_atomic
from model.training.pseudo_masks.clustering import DEFAULT_KS, salient_mask
from model.training.pseudo_masks.features import FeatureExtractor

log = logging.getLogger(__name__)

PSEUDO_MASK_FORMAT = "zutis-pseudo-masks/1"


def _shard_files(out_dir: Path) -> list[Path]:
    """The shards in ``out_dir``, in shard order."""
    return sorted(out_dir.glob("masks-[0-9][0-9][0-9][0-9][0-9].json"))


def generate_pseudo_masks(paths: Iterable[str | Path], extractors: Mapping[str, FeatureExtractor],
                          out_dir: str | Path, ks: Sequence[int] = DEFAULT_KS, shard_size: int = 1000,
                          progress: bool = True, *, max_tokens: int = 16384, max_mask_side: int = 512,
                          n_init: int = 10, seed: int = 0) -> Path:
    """Compute and store one salient-object mask per image (``salient_mask``), resumably.

    Args:
        paths: image files; duplicates are processed once. Images already in a shard of ``out_dir`` are skipped.
        extractors: named feature extractors; the names, ``ks`` and the numeric options form the settings every
            shard records. A shard with other settings in ``out_dir`` raises ``ValueError``. Only names are
            compared, so when an extractor's weights may change, put their identity in its name.
        out_dir: created if needed; receives ``masks-NNNNN.json`` shards of up to ``shard_size`` images.

    Returns:
        ``out_dir``. Unreadable images (logged warning) and images without any candidate (uniform images) are
        recorded under ``"failed"`` and not retried.
    """
    if not extractors:
        raise ValueError("at least one feature extractor is needed")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"extractors": list(extractors), "ks": [int(k) for k in ks], "max_tokens": max_tokens,
                "max_mask_side": max_mask_side, "n_init": n_init, "seed": seed}
    done, next_shard = _stored_paths(out_dir, settings)
    todo = [p for p in dict.fromkeys(str(p) for p in paths) if p not in done]

    def mask_of(image: Image.Image) -> np.ndarray | None:
        return salient_mask(image, extractors, ks, max_tokens, max_mask_side, n_init, seed)

    bar = tqdm(total=len(done) + len(todo), initial=len(done), unit="img", desc="pseudo-masks",
               disable=not progress, smoothing=0.05)
    for start in range(0, len(todo), shard_size):
        masks, failed = _mask_images(todo[start:start + shard_size], mask_of, bar)
        write_json_atomic(out_dir / f"masks-{next_shard:05d}.json",
                          {"format": PSEUDO_MASK_FORMAT, "settings": settings, "masks": masks, "failed": failed})
        next_shard += 1
    bar.close()
    return out_dir


def _stored_paths(out_dir: Path, settings: dict[str, Any]) -> tuple[set[str], int]:
    """Paths already in ``out_dir``'s shards (masked or failed) and the number of the next shard.

    Raises ``ValueError`` if a shard was made with other ``settings``.
    """
    done: set[str] = set()
    shard_files = _shard_files(out_dir)
    for shard_file in shard_files:
        shard = json.loads(shard_file.read_text())
        if shard.get("settings") != settings:
            raise ValueError(f"{shard_file} was made with other settings ({shard.get('settings')}, now {settings}); "
                             "use a new output directory")
        done.update(shard["masks"], shard["failed"])
    next_shard = int(shard_files[-1].stem.split("-")[1]) + 1 if shard_files else 0
    return done, next_shard


def _mask_images(paths: Sequence[str], mask_of: Callable[[Image.Image], np.ndarray | None],
                 bar: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """One shard's content: ``({path: COCO RLE}, {path: reason})`` for ``paths`` in order, ``bar`` advanced per image.

    ``mask_of`` maps an RGB image to its bool ``(H, W)`` mask, or ``None`` when it has no candidate segments.
    """
    masks: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for path in paths:
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except Exception as error:  # an unreadable image is skipped, the run goes on
            log.warning("skipping unreadable image %s (%s: %s)", path, type(error).__name__, error)
            failed[path] = f"unreadable: {type(error).__name__}: {error}"
            bar.update(1)
            continue
        mask = mask_of(image)
        if mask is None:
            failed[path] = "no candidate segments (uniform features)"
        else:
            masks[path] = encode_masks(mask[None])[0]
        bar.update(1)
    return masks, failed


def load_pseudo_masks(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """All stored masks: ``{path: {"size": [H, W], "counts": str}}`` (COCO RLE; decode with ``model.rle``)."""
    out_dir = Path(out_dir)
    shard_files = _shard_files(out_dir) if out_dir.is_dir() else []
    if not shard_files:
        raise FileNotFoundError(f"no pseudo-mask shards (masks-NNNNN.json) in {out_dir}")
    masks: dict[str, dict[str, Any]] = {}
    for shard_file in shard_files:
        shard = json.loads(shard_file.read_text())
        if shard.get("format") != PSEUDO_MASK_FORMAT:
            raise ValueError(f"{shard_file}: unknown format {shard.get('format')!r}")
        masks.update(shard["masks"])
    return masks


__all__ = ["PSEUDO_MASK_FORMAT", "generate_pseudo_masks", "load_pseudo_masks"]
