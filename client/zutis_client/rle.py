"""COCO compressed RLE (the ``segmentation`` of an instance) to a numpy mask, without pycocotools."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from zutis_client.errors import ZutisUsageError


def decode_counts(counts: str) -> list[int]:
    """The run lengths of pycocotools' string form of ``counts``.

    Each run is a little-endian sequence of 6-bit groups stored as ``chr(48 + group)``: 5 data bits, bit 0x20
    set while more groups follow, bit 0x10 of the last group the sign. From the third run on, a run is stored as
    the difference to the run two before it.
    """
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value = shift = 0
        while True:
            group = ord(counts[position]) - 48
            position += 1
            value |= (group & 0x1F) << shift
            shift += 5
            if not group & 0x20:
                if group & 0x10:
                    value |= -1 << shift
                break
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """``{"size": [h, w], "counts": "<string>"}`` -> a bool mask of shape ``(h, w)``.

    Runs alternate background/foreground, starting with background, over the pixels in column-major order.

    Raises:
        ZutisUsageError: ``invalid_argument``, the runs do not add up to ``h * w`` (also a ValueError).
    """
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    runs = decode_counts(counts if isinstance(counts, str) else counts.decode("ascii"))
    if sum(runs) != height * width or min(runs, default=0) < 0:
        raise ZutisUsageError("invalid_argument", f"RLE runs add up to {sum(runs)} pixels, not {height} x {width}")
    values = np.arange(len(runs)) % 2 == 1
    flat = np.repeat(values, runs)
    return flat.reshape(width, height).T.copy()
