"""A picture of a shapes-world checkpoint at work: held-out scenes, the truth beside the prediction.

Each row is one scene: the image, its true objects (drawn exactly as the service draws an answer, score 1.00) and
the checkpoint's answer with the full vocabulary of its metadata (all 64 concepts for the shipped checkpoint), at
the checkpoint's default thresholds. Scenes are taken in file order (no picking).

    .venv/bin/python experiments/shapes/shapes_grid.py --checkpoint weights/zutis-shapes.safetensors \\
        --scenes runs/shapes/cache/shapes_test-*/ --rows 6 --out docs/shapes-grid.png

A script, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence


ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def truth_prediction(coco: dict[str, Any], image: dict[str, Any], vocabulary: Sequence[str]) -> Any:
    """The true objects of ``image`` (a COCO ``images`` entry of ``coco``) as a ``Prediction`` over
    ``vocabulary`` (background first), each with score 1, so that they are drawn like an answer."""
    from pycocotools import mask as mask_utils

    from model.postprocess import InstancePrediction, Prediction

    names = {c["id"]: c["name"] for c in coco["categories"]}
    instances = []
    for ann in (a for a in coco["annotations"] if a["image_id"] == image["id"]):
        name = names[ann["category_id"]]
        area = int(mask_utils.area(ann["segmentation"]))
        instances.append(InstancePrediction(list(vocabulary).index(name), name, 1.0, tuple(ann["bbox"]), area,
                                            mask_utils.decode(ann["segmentation"]).astype(bool)))
    return Prediction((image["height"], image["width"]), list(vocabulary), instances, None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--scenes", type=Path, required=True, help="scene folder (images/, instances.json)")
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--scale", type=int, default=3, help="nearest-neighbour upscaling of every panel")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    for path in (args.checkpoint, args.scenes / "instances.json"):
        if not path.is_file():
            parser.error(f"file not found: {path}")

    import torch
    from PIL import Image, ImageDraw, ImageFont

    from model.overlay import draw_overlay
    from model.predictor import Predictor
    from service.schema import build_response

    torch.set_flush_denormal(True)
    predictor = Predictor.from_checkpoint(args.checkpoint, "cpu", "float32")
    vocabulary = [c for c in predictor.metadata.vocabulary if c != "background"]
    coco = json.loads((args.scenes / "instances.json").read_text())
    rows = []
    for image_info in coco["images"][:args.rows]:
        image = Image.open(args.scenes / "images" / image_info["file_name"]).convert("RGB")
        big = image.resize((image.width * args.scale, image.height * args.scale), Image.NEAREST)
        prediction = predictor.predict([image], vocabulary, semantic=False)[0]
        truth = truth_prediction(coco, image_info, prediction.concepts)
        # drawn at the upscaled size so that labels stay readable
        panels = [big] + [draw_overlay(big, build_response(_scaled(p, args.scale), "x", "none"))
                          for p in (truth, prediction)]
        rows.append(panels)
    w, h = rows[0][0].size
    header = 18
    grid = Image.new("RGB", (3 * w + 8, header + len(rows) * (h + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for col, title in enumerate(("held-out scene", "truth", f"{predictor.model_id}: answer (all 64 concepts)")):
        draw.text((col * (w + 4) + 4, 3), title, fill=(0, 0, 0), font=font)
    for r, panels in enumerate(rows):
        for col, panel in enumerate(panels):
            grid.paste(panel, (col * (w + 4), header + r * (h + 4)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out} ({len(rows)} scenes)")
    return 0


def _scaled(prediction: Any, scale: int) -> Any:
    """``prediction`` with every mask and box upscaled ``scale`` x (nearest), for drawing on an upscaled image."""
    from model.postprocess import InstancePrediction, Prediction
    h, w = prediction.image_hw
    instances = []
    for inst in prediction.instances:
        mask = np.asarray(inst.mask).astype(bool).repeat(scale, 0).repeat(scale, 1)
        x, y, bw, bh = inst.bbox_xywh
        instances.append(InstancePrediction(inst.concept_index, inst.concept, inst.score,
                                            (x * scale, y * scale, bw * scale, bh * scale), int(mask.sum()), mask))
    return Prediction((h * scale, w * scale), prediction.concepts, instances, None)


if __name__ == "__main__":
    sys.exit(main())
