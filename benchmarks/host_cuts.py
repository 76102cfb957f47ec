"""Before/after, in one run, of the three host-side cuts measured by benchmarks/host_bench.py (CPU-ms per
640 x 480 image, one thread, median of ``--repeats``): the input normalisation (out-of-place expression vs in
place), the semantic PNG (zlib's default strategy vs run-length), the RLE of 10 masks (transposed on the CPU vs
received transposed from the device). Each pair is checked to give the same result before it is timed.

    OMP_WAIT_POLICY=PASSIVE MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \\
        .venv/bin/python benchmarks/host_cuts.py
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.fixtures import blob_jpeg, blob_masks  # noqa: E402
from benchmarks.host_bench import IMAGE_HW, cpu_ms  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)

    import torch
    from PIL import Image
    from pycocotools import mask as mask_utils

    from model.config import IMAGENET_MEAN, IMAGENET_STD
    from model.geometry import normalise_pixels
    from model.rle import encode_column_major, encode_semantic_png

    torch.set_num_threads(1)
    image = Image.open(io.BytesIO(blob_jpeg(*IMAGE_HW, noise=6.0))).convert("RGB")
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def normalise_before() -> torch.Tensor:
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return (pixels - mean) / std

    def normalise_after() -> torch.Tensor:
        return normalise_pixels(image, IMAGE_HW, IMAGENET_MEAN, IMAGENET_STD)

    assert torch.equal(normalise_before(), normalise_after())

    masks = torch.from_numpy(blob_masks(IMAGE_HW, 10))
    label_map = np.zeros(IMAGE_HW, dtype=np.uint8)
    for k in range(10):
        label_map[masks[k].numpy()] = 1 + k % 5

    def png_before() -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(label_map, mode="L").save(buffer, format="PNG")
        return buffer.getvalue()

    import base64

    after_png = base64.b64decode(encode_semantic_png(label_map))
    decoded = [np.asarray(Image.open(io.BytesIO(data))) for data in (png_before(), after_png)]
    assert np.array_equal(decoded[0], decoded[1])

    def rle_before() -> list:
        return mask_utils.encode(np.asfortranarray(masks.numpy().transpose(1, 2, 0).astype(np.uint8)))

    columns = masks.transpose(1, 2).contiguous().numpy()
    assert [r["counts"].decode() for r in rle_before()] == [r["counts"] for r in encode_column_major(columns)]

    result = {
        "normalise_ms": {"before": cpu_ms(normalise_before, args.repeats), "after": cpu_ms(normalise_after,
                                                                                            args.repeats)},
        "png_ms": {"before": cpu_ms(png_before, args.repeats),
                   "after": cpu_ms(lambda: encode_semantic_png(label_map), args.repeats)},
        "png_bytes": {"before": len(png_before()), "after": len(after_png)},
        "rle_ms": {"before": cpu_ms(rle_before, args.repeats),
                   "after": cpu_ms(lambda: encode_column_major(columns), args.repeats)},
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
