"""Do a checkpoint's features carry position? Linear probes of the grid position on held-out scenes.

ZUTIS's mask proposals are ``sigmoid(<E_q, M>)`` with ``M = ffn1(F_up)`` (reference §1.8): a proposal can separate
two objects only through ``M``, so two objects of the same colour can be told apart only if ``M`` says *where* a
pixel is. This script measures that: ridge regressions of a cell's normalised row and column (in [0, 1]) from
(a) the encoder's patch tokens after ``ln_post`` and (b) the mask features ``M`` (with the checkpoint's own
``mask_position`` option applied), fitted on the cells of the first half of the scenes and scored (R^2, and the mean
absolute error in cells) on the second half. R^2 1 means position is linearly decodable; 0, not at all.

    MALLOC_MMAP_THRESHOLD_=33554432 .venv/bin/python experiments/shapes/position_probe.py \\
        --checkpoint weights/zutis-shapes.safetensors --scenes runs/ladder/cache/shapes_test-*/ --max-images 100

A script, not a test. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def ridge_r2(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
             alpha: float = 1.0) -> tuple[float, float]:
    """Ridge regression of ``y`` (N,) from standardised ``x`` (N, D): held-out (R^2, mean absolute error)."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    xt, xe = (x_train - mu) / sd, (x_test - mu) / sd
    xt, xe = np.hstack([xt, np.ones((len(xt), 1))]), np.hstack([xe, np.ones((len(xe), 1))])
    w = np.linalg.solve(xt.T @ xt + alpha * np.eye(xt.shape[1]), xt.T @ y_train)
    pred = xe @ w
    r2 = 1.0 - float(((pred - y_test) ** 2).sum() / ((y_test - y_test.mean()) ** 2).sum())
    return r2, float(np.abs(pred - y_test).mean())


def features(checkpoint: Path, scenes: Path, max_images: int | None) -> dict[str, Any]:
    """(N, h'w', D) upsampled tokens and mask features of the scenes, with the grid size."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from model.backbone import encode_patch_tokens
    from model.checkpoint import load_checkpoint
    from model.decoder import sine_position_encoding

    loaded = load_checkpoint(checkpoint)
    model, cfg = loaded.model.eval(), loaded.metadata.model_config
    coco = json.loads((scenes / "instances.json").read_text())
    images = coco["images"][:max_images] if max_images else coco["images"]
    size = cfg.input_size
    mean, std = torch.tensor(cfg.image_mean).view(1, 3, 1, 1), torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    tokens_out, mask_out = [], []
    with torch.inference_mode():
        for im in images:
            x = torch.from_numpy(np.array(Image.open(scenes / "images" / im["file_name"]).convert("RGB")))
            x = x.permute(2, 0, 1)[None].float() / 255.0
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            tokens, h, w = encode_patch_tokens(model.encoder, (x - mean) / std)
            grid = F.interpolate(tokens.transpose(1, 2).reshape(1, -1, h, w), scale_factor=2, mode="bilinear",
                                 align_corners=False)
            up = grid.flatten(2).transpose(1, 2)
            pos = sine_position_encoding(1, up.shape[-1], 2 * h, 2 * w, up.device).flatten(2).permute(2, 0, 1)
            tokens_out.append(up[0].numpy())
            mask_out.append(model._mask_features(up, pos)[0].numpy())
    return {"tokens": np.stack(tokens_out), "mask_features": np.stack(mask_out), "grid": (2 * h, 2 * w)}


def probe(checkpoint: Path, scenes: Path, max_images: int | None) -> dict[str, Any]:
    feats = features(checkpoint, scenes, max_images)
    gh, gw = feats["grid"]
    n = feats["tokens"].shape[0]
    rows = np.repeat(np.arange(gh), gw) / (gh - 1)
    cols = np.tile(np.arange(gw), gh) / (gw - 1)
    half = n // 2
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "scenes": str(scenes), "images": n, "grid": [gh, gw]}
    for name in ("tokens", "mask_features"):
        x = feats[name]
        xt, xe = x[:half].reshape(-1, x.shape[-1]), x[half:].reshape(-1, x.shape[-1])
        for axis, target in (("row", rows), ("col", cols)):
            yt, ye = np.tile(target, half), np.tile(target, n - half)
            r2, mae = ridge_r2(xt, yt, xe, ye)
            result[f"{name}_{axis}_r2"] = round(r2, 4)
            result[f"{name}_{axis}_mae_cells"] = round(mae * (gh - 1), 2)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--scenes", type=Path, required=True, help="a scene folder (images/, instances.json)")
    parser.add_argument("--max-images", type=int, default=100)
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.checkpoint, args.scenes, args.max_images)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
