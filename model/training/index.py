"""Training-data stage 1: a CLIP image-embedding index over folders of images (reference §5.1).

Layout of an index directory (nothing is pickled):

- ``embeddings-00000.npy``: float16 ``(n, E)``, L2-normalised pooled CLIP image embeddings of one shard;
- ``paths-00000.txt``: the ``n`` absolute image paths of that shard, one per line, in row order;
- ``shard-00000.json``: written last, it marks the shard complete and records which inputs and settings made it
  and which of its images could not be read;
- ``manifest.json``: written once every shard is complete (model id and checksum, image folders, preprocessing,
  count, dim, shard list, skipped images). Its presence is what makes the directory a finished index.

Shard ``i`` covers images ``[i * shard_size, (i + 1) * shard_size)`` of the sorted file list. Each file is written
to a temporary name and renamed, so a crash loses at most the shard being written, and a rerun skips the
completed shards (after checking they were made from the same images, model and preprocessing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from model.clip_weights import ClipTowers, load_clip
from model.config import CLIP_MEAN, CLIP_STD, ModelConfig
from model.training.files import IMAGE_SUFFIXES, is_image_file, write_atomic, write_json_atomic

log = logging.getLogger(__name__)

INDEX_FORMAT = "zutis-index/1"
MANIFEST = "manifest.json"


# -- inputs ----------------------------------------------------------------------------------------------------
def list_images(image_dirs: Sequence[str | Path]) -> list[str]:
    """Absolute paths of every image under ``image_dirs`` (recursive), in a deterministic order.

    Folders are taken in the given order; inside each, directories and files are visited in sorted order.
    Image files are those ``model.training.files.is_image_file`` accepts (any case). A missing folder, a folder with no
    images, or no folders at all raise (``FileNotFoundError`` / ``ValueError``) before anything is computed.
    """
    if not image_dirs:
        raise ValueError("no image folders given")
    paths: list[str] = []
    for image_dir in image_dirs:
        root = os.path.abspath(image_dir)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {image_dir}")
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            found.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                         if is_image_file(f))
        if not found:
            raise ValueError(f"image folder has no images ({', '.join(IMAGE_SUFFIXES)}): {image_dir}")
        paths.extend(found)
    return list(dict.fromkeys(paths))  # a folder given twice, or inside another, contributes its images once


@dataclass(frozen=True)
class ImagePreprocess:
    """CLIP's evaluation preprocessing: shorter side to ``size`` (bicubic), centre crop ``size x size``, then
    ``(x - mean) / std`` per RGB channel on [0, 1] values. Calling it on a PIL image gives float32 (3, S, S).

    The resize and crop arithmetic follow torchvision's ``Resize(size)`` + ``CenterCrop(size)`` (what open_clip's
    ``image_transform`` uses), so embeddings match open_clip's own preprocessing.
    """

    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __call__(self, image: Any) -> torch.Tensor:
        image = image.convert("RGB")
        w, h = image.size
        s = self.size
        short, long = (w, h) if w <= h else (h, w)
        if short != s:
            new_short, new_long = s, int(s * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
            w, h = new_w, new_h
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        image = image.crop((left, top, left + s, top + s))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (x - mean) / std


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes and preprocesses images; an unreadable file gives a zero image and its error message."""

    def __init__(self, paths: Sequence[str], preprocess: ImagePreprocess) -> None:
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        path = self.paths[i]
        try:
            if "\n" in path or "\r" in path:
                raise ValueError("a line break in the file name cannot be stored in the paths file")
            with Image.open(path) as im:
                im.load()
                return self.preprocess(im), ""
        except Exception as error:  # any decoder failure: the image is skipped, the run goes on
            s = self.preprocess.size
            return torch.zeros(3, s, s), f"{type(error).__name__}: {error}".rstrip(": ")


# -- checksums -------------------------------------------------------------------------------------------------
def tower_checksum(module: torch.nn.Module) -> str:
    """sha256 identifying a module's weights: names, shapes and values in name order.

    Floating-point tensors are hashed as float16, so a tower and its float16 copy (``--fp16``) share a checksum.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach()
        t = (t.to(torch.float16) if t.is_floating_point() else t).cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _sha256_lines(lines: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _shard_names(i: int) -> tuple[str, str, str]:
    return f"embeddings-{i:05d}.npy", f"paths-{i:05d}.txt", f"shard-{i:05d}.json"


def _completed_shard(out_dir: Path, i: int, inputs_sha: str, settings_sha: str) -> dict[str, Any] | None:
    """The marker of shard ``i`` if it is complete; raises if it was made from other images or settings."""
    emb_name, paths_name, marker_name = _shard_names(i)
    marker_path = out_dir / marker_name
    if not marker_path.is_file():
        return None
    marker = json.loads(marker_path.read_text())
    if marker.get("inputs_sha256") != inputs_sha or marker.get("settings_sha256") != settings_sha:
        raise ValueError(f"{out_dir} holds shard {i} of an index built from other images, another model or other "
                         "preprocessing (or another shard size); use a new output directory")
    if not (out_dir / emb_name).is_file() or not (out_dir / paths_name).is_file():
        return None
    return marker


def build_index(image_dirs: Sequence[str | Path], clip: ClipTowers, out_dir: str | Path,
                image_size: int | None = None, batch_size: int = 64, shard_size: int = 50_000,
                progress: bool = True, *, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                num_workers: int = 0, model_id: str | None = None) -> Path:
    """Embed every image under ``image_dirs`` with ``clip.visual`` and write a sharded index to ``out_dir``.

    Args:
        image_dirs: folders searched recursively (see ``list_images``); each must hold at least one image.
        clip: CLIP towers; only ``clip.visual`` (an open_clip ``VisionTransformer``) is used, on the device and
            dtype of its parameters. ``clip.visual(x)`` must give pooled projected features ``(B, E)``.
        out_dir: created if needed; completed shards already there are reused (resume).
        image_size: input side ``S`` in pixels; default the tower's own ``image_size``.
        batch_size, shard_size: images per forward pass, images per shard (of the sorted input list).
        progress: show a tqdm bar with ETA.
        mean, std: per-channel normalisation of [0, 1] RGB (default CLIP's).
        num_workers: DataLoader worker processes decoding images (0: decode in this process).
        model_id: a human-readable name of the weights (e.g. the file name), recorded in the manifest.

    Returns:
        ``out_dir`` as a ``Path``. Embeddings are fp32-normalised then stored as float16 ``(n, E)`` per shard.
        Unreadable images are skipped with a logged warning and listed under ``"skipped"`` in the manifest.
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be positive, got {batch_size} and {shard_size}")
    paths = list_images(image_dirs)  # raises before any model work on missing or empty folders
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if image_size is None:
        image_size = int(getattr(clip.visual, "image_size", (0,))[0])
        if image_size < 1:
            raise ValueError("the vision tower has no image_size; pass image_size")
    preprocess = ImagePreprocess(int(image_size), tuple(float(v) for v in mean), tuple(float(v) for v in std))
    checksum = tower_checksum(clip.visual)
    settings = {"model_checksum": checksum, "image_size": preprocess.size, "mean": list(preprocess.mean),
                "std": list(preprocess.std), "shard_size": shard_size, "dtype": "float16"}
    settings_sha = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    param = next(clip.visual.parameters())
    device, dtype = param.device, param.dtype

    num_shards = (len(paths) + shard_size - 1) // shard_size
    shard_inputs = [paths[i * shard_size:(i + 1) * shard_size] for i in range(num_shards)]
    markers: list[dict[str, Any] | None] = [
        _completed_shard(out_dir, i, _sha256_lines(shard_inputs[i]), settings_sha) for i in range(num_shards)]
    done = sum(len(shard_inputs[i]) for i, m in enumerate(markers) if m is not None)
    if done:
        log.info("resuming %s: %d of %d shards already complete", out_dir, sum(m is not None for m in markers),
                 num_shards)
    bar = tqdm(total=len(paths), initial=done, unit="img", desc="index", disable=not progress, smoothing=0.05)
    clip.visual.eval()
    for i in range(num_shards):
        if markers[i] is not None:
            continue
        markers[i] = _build_shard(out_dir, i, shard_inputs[i], clip.visual, preprocess, device, dtype,
                                  batch_size, num_workers, settings_sha, bar)
    bar.close()
    _write_manifest(out_dir, markers, len(paths), image_dirs, preprocess, checksum, shard_size, model_id)
    return out_dir


def _write_manifest(out_dir: Path, markers: Sequence[dict[str, Any] | None], num_paths: int,
                    image_dirs: Sequence[str | Path], preprocess: ImagePreprocess, checksum: str, shard_size: int,
                    model_id: str | None) -> None:
    """Write ``manifest.json`` from the markers of all (complete) shards: what makes ``out_dir`` a finished index.

    Raises ``ValueError`` (writing nothing) when none of the ``num_paths`` images could be read.
    """
    shards, skipped, count, dim = [], [], 0, None
    for i, marker in enumerate(markers):
        assert marker is not None
        emb_name, paths_name, _ = _shard_names(i)
        shards.append({"embeddings": emb_name, "paths": paths_name, "count": marker["count"]})
        skipped.extend(marker["skipped"])
        count += marker["count"]
        dim = marker["dim"] if marker["dim"] is not None else dim
    if count == 0:
        raise ValueError(f"none of the {num_paths} images could be read (see the warnings); no index written")
    manifest = {"format": INDEX_FORMAT, "model_id": model_id, "model_checksum": checksum,
                "image_dirs": [os.path.abspath(d) for d in image_dirs], "image_size": preprocess.size,
                "mean": list(preprocess.mean), "std": list(preprocess.std), "count": count, "dim": dim,
                "dtype": "float16", "shard_size": shard_size, "shards": shards, "skipped": skipped}
    write_json_atomic(out_dir / MANIFEST, manifest)


def _build_shard(out_dir: Path, i: int, inputs: list[str], visual: torch.nn.Module, preprocess: ImagePreprocess,
                 device: torch.device, dtype: torch.dtype, batch_size: int, num_workers: int,
                 settings_sha: str, bar: Any) -> dict[str, Any]:
    """Embed one shard's images and write its three files (marker last); returns the marker."""
    loader = torch.utils.data.DataLoader(_ImageFiles(inputs, preprocess), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, pin_memory=device.type == "cuda")
    chunks: list[np.ndarray] = []
    kept: list[str] = []
    skipped: list[dict[str, str]] = []
    offset = 0
    with torch.inference_mode():
        for images, errors in loader:
            batch_paths = inputs[offset:offset + len(errors)]
            offset += len(errors)
            ok = [j for j, e in enumerate(errors) if not e]
            for path, error in zip(batch_paths, errors):
                if error:
                    log.warning("skipping unreadable image %s (%s)", path, error)
                    skipped.append({"path": path, "error": error})
            if ok:
                x = images[ok].to(device=device, dtype=dtype, non_blocking=True)
                emb = F.normalize(visual(x).float(), dim=-1)
                chunks.append(emb.to(torch.float16).cpu().numpy())
                kept.extend(batch_paths[j] for j in ok)
            bar.update(len(errors))
    dim = int(chunks[0].shape[1]) if chunks else None
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float16)
    emb_name, paths_name, marker_name = _shard_names(i)
    write_atomic(out_dir / emb_name, lambda f: np.save(f, embeddings, allow_pickle=False))
    write_atomic(out_dir / paths_name, lambda f: f.write("".join(p + "\n" for p in kept).encode()))
    marker = {"shard": i, "inputs_sha256": _sha256_lines(inputs), "settings_sha256": settings_sha,
              "count": len(kept), "dim": dim, "skipped": skipped}
    write_json_atomic(out_dir / marker_name, marker)
    return marker


# -- reading ---------------------------------------------------------------------------------------------------
def read_manifest(index_dir: str | Path) -> dict[str, Any]:
    """The manifest of a finished index; ``FileNotFoundError`` if ``index_dir`` is not one."""
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {index_dir}: not a finished index (run python -m model.index)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: unknown index format {manifest.get('format')!r}")
    return manifest


def iter_index_shards(index_dir: str | Path) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Yield ``(embeddings, paths)`` per shard: float16 ``(n, E)`` memory-mapped read-only, and ``n`` paths."""
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    for shard in manifest["shards"]:
        paths = (index_dir / shard["paths"]).read_text().splitlines()
        if shard["count"] == 0:
            yield np.zeros((0, manifest["dim"]), dtype=np.float16), paths
            continue
        embeddings = np.load(index_dir / shard["embeddings"], mmap_mode="r", allow_pickle=False)
        if embeddings.dtype != np.float16 or embeddings.shape != (shard["count"], manifest["dim"]) \
                or len(paths) != shard["count"]:
            raise ValueError(f"{index_dir}: shard {shard['embeddings']} does not match the manifest "
                             f"(shape {embeddings.shape}, {len(paths)} paths, expected {shard['count']} rows)")
        yield embeddings, paths


def load_index(index_dir: str | Path) -> tuple[np.ndarray, list[str]]:
    """The whole index: float16 ``(N, E)`` unit-norm embeddings and the ``N`` image paths in row order.

    A single-shard index is returned memory-mapped (read-only); several shards are concatenated in memory
    (``N * E * 2`` bytes). To stream a large index without loading it, use ``iter_index_shards``.
    """
    parts = list(iter_index_shards(index_dir))
    paths = [p for _, shard_paths in parts for p in shard_paths]
    if len(parts) == 1:
        return parts[0][0], paths
    return np.concatenate([e for e, _ in parts]), paths


# -- command line ----------------------------------------------------------------------------------------------
def add_clip_arguments(parser: argparse.ArgumentParser) -> None:
    """``--clip FILE [--clip-arch NAME] [--device D] [--fp16]``: how the training-data CLIs load CLIP."""
    parser.add_argument("--clip", required=True, type=Path,
                        help="CLIP weights: our CLIP safetensors (architecture in its metadata), or an "
                             "OpenAI/open_clip file together with --clip-arch")
    parser.add_argument("--clip-arch", default=None,
                        help="open_clip architecture of --clip when it is not our safetensors, e.g. "
                             "ViT-L-14-336-quickgelu (OpenAI's releases use QuickGELU: pick the -quickgelu name)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fp16", action="store_true", help="run the towers in float16 (CUDA only)")


def check_clip_file(args: argparse.Namespace) -> None:
    """Fail at start, naming the file, if the CLIP weights file is missing."""
    if not args.clip.is_file():
        raise FileNotFoundError(f"CLIP weights file not found: {args.clip}")


def load_clip_from_arguments(args: argparse.Namespace) -> ClipTowers:
    """Load the CLIP named by ``add_clip_arguments``'s options onto ``args.device``."""
    check_clip_file(args)
    config = ModelConfig(clip_model=args.clip_arch) if args.clip_arch else None
    clip = load_clip(args.clip, config)
    if args.fp16 and not str(args.device).startswith("cuda"):
        raise ValueError("--fp16 needs a CUDA device")
    dtype = torch.float16 if args.fp16 else torch.float32
    return ClipTowers(clip.config, clip.visual.to(args.device, dtype), clip.text.to(args.device, dtype))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.index", description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="+", required=True, type=Path, help="image folders (recursive)")
    parser.add_argument("--out", required=True, type=Path, help="index directory (reruns resume)")
    add_clip_arguments(parser)
    parser.add_argument("--image-size", type=int, default=None, help="default: the tower's input size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=50_000)
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    check_clip_file(args)
    list_images(args.images)  # folder errors before the model loads
    clip = load_clip_from_arguments(args)
    out = build_index(args.images, clip, args.out, image_size=args.image_size, batch_size=args.batch_size,
                      shard_size=args.shard_size, progress=not args.no_progress, num_workers=args.num_workers,
                      model_id=args.clip.name)
    manifest = read_manifest(out)
    print(f"indexed {manifest['count']} images ({len(manifest['skipped'])} skipped) into {out}")
    return 0


__all__ = ["ImagePreprocess", "list_images", "tower_checksum",
           "build_index", "read_manifest", "iter_index_shards", "load_index",
           "add_clip_arguments", "check_clip_file", "load_clip_from_arguments", "main"]
