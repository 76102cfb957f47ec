"""Mask encodings for the JSON answer: COCO RLE (``counts`` as str), COCO boxes, and semantic label maps as a
base64 PNG or as one RLE per present class. Every encoder has a decoder and round-trips exactly.
"""

from __future__ import annotations

import base64
import io
import zlib
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def as_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """A numpy view (or CPU copy) of an array or tensor on any device."""
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def encode_masks(masks: np.ndarray | torch.Tensor) -> list[dict[str, Any]]:
    """COCO RLEs of binary masks (pycocotools, column-major as COCO expects).

    Args:
        masks: ``(N, H, W)`` bool (numpy, or a tensor on any device, transposed there before the copy to the CPU).

    Returns:
        ``N`` dicts ``{"size": [H, W], "counts": str}`` (the compressed COCO string, decoded as ASCII).
    """
    if not isinstance(masks, torch.Tensor):
        masks = np.asarray(masks)
    if masks.ndim != 3 or masks.dtype not in (np.bool_, torch.bool):
        raise ValueError(f"masks must be (N, H, W) bool, got shape {tuple(masks.shape)} dtype {masks.dtype}")
    # The transpose to column-major order is the costly part (a cache-unfriendly copy): a tensor is transposed
    # where it lives, so that on a GPU host the CPU receives the ready buffer.
    if isinstance(masks, torch.Tensor):
        columns = masks.detach().transpose(1, 2).contiguous().cpu().numpy()
    else:
        columns = np.ascontiguousarray(masks.transpose(0, 2, 1))
    return encode_column_major(columns)


def encode_column_major(columns: np.ndarray) -> list[dict[str, Any]]:
    """COCO RLEs of binary masks given column by column: ``columns`` is ``(N, W, H)`` bool, C-contiguous (the
    masks transposed). Returns ``N`` dicts ``{"size": [H, W], "counts": str}``."""
    if columns.ndim != 3 or columns.dtype != np.bool_ or not columns.flags["C_CONTIGUOUS"]:
        raise ValueError(f"columns must be C-contiguous (N, W, H) bool, got shape {columns.shape} "
                         f"dtype {columns.dtype}")
    if columns.shape[0] == 0:
        return []
    # pycocotools wants (H, W, N) uint8 in Fortran order: exactly the bytes of (N, W, H) in C order (bool and uint8
    # share their bytes, 0/1).
    rles = mask_utils.encode(columns.view(np.uint8).transpose(2, 1, 0))
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def _check_rle(rle: Any) -> dict[str, Any]:
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("an RLE must be a dict with 'size' and 'counts'")
    size = rle["size"]
    if len(size) != 2 or int(size[0]) < 0 or int(size[1]) < 0:
        raise ValueError(f"RLE size must be [H, W], got {size}")
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    if not isinstance(counts, bytes):
        raise ValueError("RLE counts must be a compressed COCO string (str or bytes)")
    return {"size": [int(size[0]), int(size[1])], "counts": counts}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """The ``(H, W)`` bool mask of one COCO RLE (``counts`` str or bytes)."""
    return mask_utils.decode(_check_rle(rle)).astype(bool)


def masks_to_boxes_xywh(masks: torch.Tensor) -> torch.Tensor:
    """COCO boxes of binary masks: ``[x, y, w, h]`` in pixels, with ``w = x_max - x_min + 1`` (inclusive).

    Args:
        masks: ``(N, H, W)`` bool on any device.

    Returns:
        ``(N, 4)`` float32 on the same device; all zeros for empty masks.
    """
    if masks.ndim != 3 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be an (N, H, W) bool tensor, got shape {tuple(masks.shape)} {masks.dtype}")
    n, h, w = masks.shape
    if n == 0 or h == 0 or w == 0:
        return torch.zeros(n, 4, dtype=torch.float32, device=masks.device)
    as_bytes = masks.view(torch.uint8)  # amax over bytes is far faster on CPU than any() over bools
    rows = as_bytes.amax(dim=2)  # (N, H), 1 where the row is occupied
    cols = as_bytes.amax(dim=1)  # (N, W)
    # argmax returns the first maximal index: the first occupied row/column, and from the flipped end the last.
    y0 = rows.argmax(dim=1)
    y1 = h - 1 - rows.flip(1).argmax(dim=1)
    x0 = cols.argmax(dim=1)
    x1 = w - 1 - cols.flip(1).argmax(dim=1)
    boxes = torch.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], dim=1).to(torch.float32)
    return boxes * rows.any(dim=1, keepdim=True)


def _check_label_map(label_map: np.ndarray | torch.Tensor) -> np.ndarray:
    arr = as_numpy(label_map)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"a label map must be (H, W) integers, got shape {arr.shape} dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
        raise ValueError(f"label map values must lie in [0, 65535], got [{arr.min()}, {arr.max()}]")
    return arr


def encode_semantic_png(label_map: np.ndarray | torch.Tensor) -> str:
    """A label map as a base64 lossless PNG: 8-bit grayscale when every value is < 256, else 16-bit.

    Args:
        label_map: ``(H, W)`` non-negative integers below 65536 (uint8/uint16 or any integer dtype).
    """
    arr = _check_label_map(label_map)
    if arr.size == 0:
        raise ValueError(f"cannot encode an empty label map (shape {arr.shape})")
    if int(arr.max()) < 256:
        image = Image.fromarray(arr.astype(np.uint8), mode="L")
    else:
        image = Image.fromarray(arr.astype(np.uint16))  # mode "I;16": PNG 16-bit grayscale
    buffer = io.BytesIO()
    # zlib's run-length strategy suits label maps (long runs): measured 1/3 less CPU and 15 % fewer bytes than the
    # default strategy on a 640 x 480 map (benchmarks/host_bench.py); the decoded map is the same.
    image.save(buffer, format="PNG", compress_type=zlib.Z_RLE)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_semantic_png(data: str) -> np.ndarray:
    """The ``(H, W)`` uint16 label map of :func:`encode_semantic_png`'s output."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError) as err:
        raise ValueError(f"semantic PNG is not valid base64: {err}") from None
    if not raw.startswith(_PNG_MAGIC):
        raise ValueError("semantic PNG data does not start with the PNG signature")
    with Image.open(io.BytesIO(raw)) as image:
        if image.mode not in ("L", "I;16", "I"):
            raise ValueError(f"semantic PNG must be 8- or 16-bit grayscale, got mode {image.mode}")
        arr = np.asarray(image)
    return arr.astype(np.uint16)


def encode_semantic_rle(label_map: np.ndarray | torch.Tensor, num_classes: int) -> list[dict[str, Any]]:
    """One COCO RLE per class present in a label map.

    Args:
        label_map: ``(H, W)`` integers in ``[0, num_classes)``.
        num_classes: ``C``, the vocabulary size (background included).

    Returns:
        ``[{"concept_index": c, "segmentation": rle}, ...]`` for the present classes in ascending order.
    """
    arr = _check_label_map(label_map)
    if arr.size and int(arr.max()) >= num_classes:
        raise ValueError(f"label map has value {int(arr.max())} but only {num_classes} classes")
    present = np.unique(arr)
    masks = arr[None, :, :] == present[:, None, None]
    return [{"concept_index": int(c), "segmentation": rle} for c, rle in zip(present, encode_masks(masks))]


def decode_semantic_rle(items: list[dict[str, Any]], hw: tuple[int, int]) -> np.ndarray:
    """The ``(H, W)`` uint16 label map of :func:`encode_semantic_rle`'s output; uncovered pixels are 0."""
    h, w = int(hw[0]), int(hw[1])
    label_map = np.zeros((h, w), dtype=np.uint16)
    if not items:
        return label_map
    rles, classes = [], []
    for item in items:
        rle = _check_rle(item.get("segmentation") if isinstance(item, dict) else None)
        if rle["size"] != [h, w]:
            raise ValueError(f"RLE size {rle['size']} does not match the label map size {[h, w]}")
        c = int(item["concept_index"])
        if not 0 <= c <= 65535:
            raise ValueError(f"concept_index {c} outside [0, 65535]")
        rles.append(rle)
        classes.append(c)
    masks = mask_utils.decode(rles).astype(bool)  # (H, W, K)
    # Later items win where masks overlap (they never do for encode_semantic_rle's output).
    last = len(classes) - 1 - masks[:, :, ::-1].argmax(axis=2)
    values = np.asarray(classes, dtype=np.uint16)[last]
    return np.where(masks.any(axis=2), values, label_map)


__all__ = [
    "as_numpy",
    "encode_masks",
    "encode_column_major",
    "decode_rle",
    "masks_to_boxes_xywh",
    "encode_semantic_png",
    "decode_semantic_png",
    "encode_semantic_rle",
    "decode_semantic_rle",
]
