"""Files on disk as the training stages see them: which files are images, atomic writes, folder fingerprints.

A file's content hash is ``model.checkpoint.file_sha256`` (the inference library needs it too).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
"""What counts as an image, matched case-insensitively (``is_image_file``) by the index, evaluation and the stage
cache alike."""


def is_image_file(name: str | Path) -> bool:
    """Whether ``name`` ends in one of ``IMAGE_SUFFIXES``, in any case (``a.JPG`` is an image)."""
    return str(name).lower().endswith(IMAGE_SUFFIXES)


def write_atomic(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, flush it to disk, then rename it over ``path``:
    a reader sees the old file or the whole new one, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` (key order kept) via a temporary file and a rename (never half-written)."""
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def folder_fingerprint(folder: str | Path) -> str:
    """SHA-256 (hex) over the sorted (relative path, size, mtime_ns) of the image files under ``folder``,
    recursively: it changes when an image is added, removed, renamed or rewritten."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: {folder}")
    entries = []
    for root, _, files in os.walk(folder):
        for name in files:
            if is_image_file(name):
                p = Path(root) / name
                st = p.stat()
                entries.append(f"{p.relative_to(folder).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}")
    entries.sort()
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


__all__ = ["IMAGE_SUFFIXES", "is_image_file", "write_atomic", "write_json_atomic", "folder_fingerprint"]
