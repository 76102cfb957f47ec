"""Where a shapes-world checkpoint fails: mask proposals and semantic colour/shape errors, against the scenes' truth.

``model.evaluate`` gives the headline numbers (AP, mIoU); this script takes them apart, on held-out scenes:

- **proposal recall**: for every true object, the best IoU of any of the model's Q last-layer mask proposals
  (probabilities > the mask threshold, resized to the image) with it, before any scoring, classification or NMS.
  It bounds class-agnostic recall. Reported over all objects and split by whether another object of the scene has
  the same colour (the mask head sees per-pixel features only), by size and by how crowded the scene is.
- **semantic errors**: over the objects' pixels, the share the semantic map calls background, and of the rest, the
  share whose predicted concept has the right colour and the right shape.
- **token probes** (``--probe``): is an object's colour / shape linearly decodable from the encoder's patch tokens
  at all? A softmax-regression probe is fitted on the tokens whose centre pixel lies on an object in the first
  half of the scenes and scored on the second half (chance: 1/8), for the checkpoint's encoder and, with
  ``--clip``, for a CLIP vision tower (the world's CLIP before ZUTIS training).

    MALLOC_MMAP_THRESHOLD_=33554432 .venv/bin/python experiments/shapes/shapes_diagnostics.py \\
        --checkpoint weights/zutis-shapes.safetensors --max-images 200

A script, not a test. Prints a Markdown table; ``--out`` writes the JSON.
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

from experiments.shapes.clip_probe import fit_linear_probe  # noqa: E402 (importable once the line above ran)
from benchmarks.reports import write_json_report  # noqa: E402

SMALL_AREA_PX = 400  # about the median object area of the 128-px test scenes


def best_proposal_ious(proposals: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """proposals (Q, H, W) bool, truth (K, H, W) bool -> (K,) the best IoU of any proposal with each object."""
    if len(proposals) == 0:
        return np.zeros(len(truth), np.float32)
    p = proposals.reshape(len(proposals), -1).astype(np.float32)
    g = truth.reshape(len(truth), -1).astype(np.float32)
    inter = g @ p.T  # (K, Q)
    union = g.sum(1, keepdims=True) + p.sum(1)[None] - inter
    return (inter / np.maximum(union, 1.0)).max(axis=1)


def recall_row(ious: np.ndarray) -> dict[str, float | int]:
    return {"objects": int(len(ious)), "recall@0.5": float((ious >= 0.5).mean()) if len(ious) else None,
            "recall@0.75": float((ious >= 0.75).mean()) if len(ious) else None,
            "mean_best_iou": float(ious.mean()) if len(ious) else None}


def diagnose(checkpoint: Path, scenes: Path, max_images: int | None) -> dict[str, Any]:
    import torch
    from PIL import Image
    from pycocotools import mask as mask_utils

    from model.resample import resample_masks_to_image
    from model.predictor import Predictor

    coco = json.loads((scenes / "instances.json").read_text())
    cats = {c["id"]: c for c in coco["categories"]}
    names = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    params = predictor.default_params
    vocabulary, text = predictor.encode_concepts(names)
    label_of_cat = {cid: vocabulary.index(cats[cid]["name"]) for cid in cats}
    # colour and shape of every vocabulary index (background first: -1), as small integer codes
    colour_of, shape_of = (np.full(len(vocabulary), -1), np.full(len(vocabulary), -1))
    for key, codes in (("colour", colour_of), ("shape", shape_of)):
        values = sorted({c[key] for c in cats.values()})
        for cid, label in label_of_cat.items():
            codes[label] = values.index(cats[cid][key])

    rows: list[tuple[float, bool, int, int]] = []  # best IoU, shares colour, area, objects in scene
    fg_pixels = fg_as_bg = colour_right = shape_right = 0
    images = coco["images"][:max_images] if max_images else coco["images"]
    for info in images:
        image = np.asarray(Image.open(scenes / "images" / info["file_name"]).convert("RGB"))
        anns = by_image.get(info["id"], [])
        prepared = predictor.prepare(image)
        with torch.inference_mode():
            out = predictor.forward([prepared])
            # the same resampling as the service's post-processing (model.resample)
            proposals = resample_masks_to_image(out.mask_probs[0].float(), prepared.letterbox,
                                                params.mask_threshold).numpy()
        prediction = predictor.postprocess(out, 0, prepared, vocabulary, text, params, semantic=True)
        if not anns:
            continue
        truth = np.stack([mask_utils.decode(a["segmentation"]).astype(bool) for a in anns])
        ious = best_proposal_ious(proposals, truth)
        colours = [cats[a["category_id"]]["colour"] for a in anns]
        for k, ann in enumerate(anns):
            rows.append((float(ious[k]), colours.count(colours[k]) > 1, int(ann["area"]), len(anns)))
            predicted = prediction.semantic[truth[k]].astype(np.int64)
            fg_pixels += predicted.size
            fg_as_bg += int((predicted == 0).sum())
            as_fg = predicted[predicted > 0]
            want = label_of_cat[ann["category_id"]]
            colour_right += int((colour_of[as_fg] == colour_of[want]).sum())
            shape_right += int((shape_of[as_fg] == shape_of[want]).sum())

    r = np.array(rows, dtype=np.float64).reshape(-1, 4)
    groups = {"all": np.ones(len(r), bool), "alone in its colour": r[:, 1] == 0, "shares its colour": r[:, 1] == 1,
              f"small (< {SMALL_AREA_PX} px)": r[:, 2] < SMALL_AREA_PX,
              f"larger (>= {SMALL_AREA_PX} px)": r[:, 2] >= SMALL_AREA_PX,
              "scenes of 1-2 objects": r[:, 3] <= 2, "scenes of 5+ objects": r[:, 3] >= 5}
    fg_as_fg = max(fg_pixels - fg_as_bg, 1)
    return {"checkpoint": str(checkpoint), "scenes": str(scenes), "num_images": len(images),
            "queries": predictor.metadata.model_config.num_queries, "mask_threshold": params.mask_threshold,
            "proposal_recall": {name: recall_row(r[m, 0]) for name, m in groups.items()},
            "semantic_object_pixels": {"pixels": fg_pixels, "called_background": fg_as_bg / max(fg_pixels, 1),
                                       "colour_right_of_the_rest": colour_right / fg_as_fg,
                                       "shape_right_of_the_rest": shape_right / fg_as_fg}}


def token_probe(encoder: Any, scenes: Path, max_images: int | None, image_size: int, mean: Sequence[float],
                std: Sequence[float], steps: int = 300, seed: int = 0) -> dict[str, float]:
    """Held-out accuracy of linear colour and shape probes on ``encoder``'s patch tokens (see the module doc)."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from model.backbone import encode_patch_tokens

    coco = json.loads((scenes / "instances.json").read_text())
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    images = coco["images"][:max_images] if max_images else coco["images"]
    pixels = np.stack([np.asarray(Image.open(scenes / "images" / im["file_name"]).convert("RGB")) for im in images])
    labels = np.stack([np.asarray(Image.open(scenes / "labels" / (Path(im["file_name"]).stem + ".png")))
                       for im in images]).astype(np.int64)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.inference_mode():
        tokens, h, w = zip(*(encode_patch_tokens(encoder.eval(), x[i:i + 32]) for i in range(0, len(x), 32)))
    feats = torch.cat(tokens).float().numpy()  # (N, h*w, D)
    h, w = h[0], w[0]
    rows = (np.arange(h) + 0.5) * labels.shape[1] / h
    cols = (np.arange(w) + 0.5) * labels.shape[2] / w
    centre = labels[:, rows.astype(int)][:, :, cols.astype(int)].reshape(len(images), -1)  # label at token centre
    on_object = (centre > 0) & (centre <= len(cats))
    half = np.arange(len(images))[:, None] < len(images) // 2
    result: dict[str, float] = {}
    for name in ("colour", "shape"):
        values = sorted({c[name] for c in cats})
        target = np.array([-1] + [values.index(c[name]) for c in cats])
        train, test = on_object & half, on_object & ~half
        result[f"{name}_accuracy"] = fit_linear_probe(feats[train], target[centre[train]], feats[test],
                                                      target[centre[test]], len(values), steps, seed)
    result["train_tokens"], result["test_tokens"] = int((on_object & half).sum()), int((on_object & ~half).sum())
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--scenes", type=Path, help="scene folder (default: the run's test scenes)")
    parser.add_argument("--max-images", type=int, help="only the first N scenes")
    parser.add_argument("--probe", action="store_true", help="also fit linear colour/shape probes on the tokens")
    parser.add_argument("--clip", type=Path, help="with --probe: also probe this CLIP file's vision tower")
    parser.add_argument("--out", type=Path, help="write the JSON here")
    args = parser.parse_args(argv)

    import torch

    torch.set_flush_denormal(True)
    from model.checkpoint import read_metadata

    scenes = args.scenes or Path(read_metadata(args.checkpoint).provenance["config"]["eval"]["image_dir"]).parent
    result = diagnose(args.checkpoint, scenes, args.max_images)
    print(f"proposal recall ({result['num_images']} scenes, {result['queries']} proposals per image)")
    print("| objects | n | recall@0.5 | recall@0.75 | mean best IoU |\n|---|---:|---:|---:|---:|")
    for name, row in result["proposal_recall"].items():
        if row["objects"]:
            print(f"| {name} | {row['objects']} | {row['recall@0.5']:.2f} | {row['recall@0.75']:.2f} | "
                  f"{row['mean_best_iou']:.2f} |")
    sem = result["semantic_object_pixels"]
    print(f"object pixels called background {sem['called_background']:.3f}; of the rest, colour right "
          f"{sem['colour_right_of_the_rest']:.3f}, shape right {sem['shape_right_of_the_rest']:.3f}")
    if args.probe:
        from model.checkpoint import load_checkpoint

        loaded = load_checkpoint(args.checkpoint)
        cfg = loaded.metadata.model_config
        encoders = {"checkpoint encoder": loaded.model.encoder}
        if args.clip:
            from model.clip_weights import load_clip

            encoders["CLIP " + args.clip.name] = load_clip(args.clip).visual
        result["token_probes"] = {}
        for name, encoder in encoders.items():
            probe = token_probe(encoder, scenes, args.max_images, loaded.metadata.inference_input_size,
                                cfg.image_mean, cfg.image_std)
            result["token_probes"][name] = probe
            print(f"{name}: linear probe on object tokens of held-out scenes: colour {probe['colour_accuracy']:.3f}, "
                  f"shape {probe['shape_accuracy']:.3f} (chance 0.125; {probe['test_tokens']} test tokens)")
    write_json_report(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
