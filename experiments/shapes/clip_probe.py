"""What a shapes-world CLIP (or a trained checkpoint's encoder) gives ZUTIS to read: rung R1 of the ladder.

- **token probes**: is an object's colour / shape linearly decodable from the encoder's patch tokens (after
  ``ln_post``, as ZUTIS reads them) on crowded held-out scenes? A softmax-regression probe is fitted on the first
  half of the scenes and scored on the second half (chance 1/8), **per token** (tokens whose centre pixel lies on
  an object, labelled with that object) and **per object** (the mean of the tokens whose centre lies on the
  object's visible mask: what a query that pools an object can read).
- **zero-shot accuracy** (CLIP files only) over all 64 ``"a {colour} {shape}"`` prompts on fresh single-object
  images at the CLIP's own size and at ZUTIS's input size (positions re-interpolated as ZUTIS does).
- **text separation** (CLIP files only): the highest cosine between the text embeddings of two different bare
  concept names ("red circle", how ZUTIS embeds categories).

    MALLOC_MMAP_THRESHOLD_=33554432 .venv/bin/python experiments/shapes/clip_probe.py \\
        --clip weights/zutis-shapes-clip.safetensors --scenes runs/shapes/cache/shapes_val-*/ --max-images 300

Use the validation scenes to compare recipes (test scenes are for the final report only). ``--checkpoint`` probes a
ZUTIS checkpoint's encoder instead. A script, not a test; ``--out`` writes the JSON.
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

from benchmarks.reports import write_json_report  # noqa: E402 (importable once the line above ran)


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                     num_classes: int, steps: int = 300, seed: int = 0) -> float:
    """Accuracy on (test_x (n, D), test_y (n,)) of a softmax regression fitted on (train_x (m, D), train_y (m,))
    with Adam (lr 1e-2, ``steps`` full-batch steps, L2 1e-3) on features standardised with the training
    statistics."""
    import torch
    import torch.nn.functional as F

    xt, xe = torch.from_numpy(np.asarray(train_x, np.float32)), torch.from_numpy(np.asarray(test_x, np.float32))
    mu, sd = xt.mean(0), xt.std(0) + 1e-6
    xt, xe = (xt - mu) / sd, (xe - mu) / sd
    yt = torch.from_numpy(np.asarray(train_y, np.int64))
    gen = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(xt.shape[1], num_classes, generator=gen)).requires_grad_()
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(xt @ weight + bias, yt) + 1e-3 * weight.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        predicted = (xe @ weight + bias).argmax(1).numpy()
    return float((predicted == np.asarray(test_y)).mean())


def token_centre_owner(instance_masks: np.ndarray, h: int, w: int) -> np.ndarray:
    """(n, H, W) bool visible masks of one scene -> (h*w,) int: the index of the object under each token's centre
    pixel, -1 for background."""
    n, height, width = instance_masks.shape
    rows = ((np.arange(h) + 0.5) * height / h).astype(int)
    cols = ((np.arange(w) + 0.5) * width / w).astype(int)
    owner = np.full((h, w), -1, dtype=np.int64)
    for i in range(n):
        owner[instance_masks[i][np.ix_(rows, cols)]] = i
    return owner.reshape(-1)


def object_features(tokens: np.ndarray, owner: np.ndarray, num_objects: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean token per object: tokens (h*w, D), owner (h*w,) from ``token_centre_owner`` -> (k, D) features and the
    (k,) indices of the objects that own at least one token (objects smaller than a token are left out)."""
    kept = [i for i in range(num_objects) if (owner == i).any()]
    feats = np.stack([tokens[owner == i].mean(0) for i in kept]) if kept else np.zeros((0, tokens.shape[1]))
    return feats, np.asarray(kept, dtype=np.int64)


def load_scenes(scenes: Path, max_images: int | None) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """A scene folder (``images/``, ``instances.json``) -> images (N, H, W, 3) uint8, per image (n, H, W) bool
    visible masks and (n,) concept ids."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    coco = json.loads((scenes / "instances.json").read_text())
    images = coco["images"][:max_images] if max_images else coco["images"]
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    pixels, masks, concepts = [], [], []
    for im in images:
        pixels.append(np.asarray(Image.open(scenes / "images" / im["file_name"]).convert("RGB")))
        anns = by_image.get(im["id"], [])
        if anns:
            masks.append(np.stack([mask_utils.decode(a["segmentation"]).astype(bool) for a in anns]))
        else:
            masks.append(np.zeros((0, im["height"], im["width"]), bool))
        concepts.append(np.asarray([a["category_id"] for a in anns], dtype=np.int64))
    return np.stack(pixels), masks, concepts


def token_probes(visual: Any, scenes: Path, max_images: int | None, image_size: int, mean: Sequence[float],
                 std: Sequence[float]) -> dict[str, float]:
    """Per-token and per-object linear colour and shape probes on ``visual``'s patch tokens (see the module doc);
    scenes are resized to ``image_size`` and normalised with ``mean``/``std``."""
    import torch
    import torch.nn.functional as F

    from model.backbone import encode_patch_tokens
    from model.training.shapes.world import ShapesWorld

    world = ShapesWorld()
    pixels, masks, concepts = load_scenes(scenes, max_images)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.inference_mode():
        out = [encode_patch_tokens(visual.eval(), x[i:i + 32]) for i in range(0, len(x), 32)]
    feats = torch.cat([t for t, _, _ in out]).float().numpy()  # (N, h*w, D)
    h, w = out[0][1], out[0][2]
    half = len(pixels) // 2
    rows: dict[str, list[list[Any]]] = {k: [[], [], [], []] for k in ("token", "object")}  # x, colour, shape, test
    for i in range(len(pixels)):
        owner = token_centre_owner(masks[i], h, w)
        on = owner >= 0
        ids = concepts[i]
        for kind, f, objs in (("token", feats[i][on], owner[on]),
                              ("object", *object_features(feats[i], owner, len(ids)))):
            rows[kind][0].append(f)
            rows[kind][1].append([world.colour_index(int(ids[o])) for o in objs])
            rows[kind][2].append([world.shape_index(int(ids[o])) for o in objs])
            rows[kind][3].append(np.full(len(objs), i >= half))
    result: dict[str, float] = {}
    for kind, (xs, colours, shapes, test) in rows.items():
        xs_all, test_all = np.concatenate(xs), np.concatenate(test)
        for name, labels in (("colour", colours), ("shape", shapes)):
            y = np.concatenate([np.asarray(v, np.int64) for v in labels])
            result[f"{kind}_{name}"] = fit_linear_probe(xs_all[~test_all], y[~test_all], xs_all[test_all],
                                                        y[test_all], 8)
        result[f"{kind}_test_samples"] = int(test_all.sum())
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--clip", type=Path, help="a CLIP file (python -m model.shapes.clip_pretrain)")
    source.add_argument("--checkpoint", type=Path, help="a ZUTIS checkpoint: probe its encoder")
    parser.add_argument("--scenes", type=Path, required=True, help="scene folder (images/, instances.json)")
    parser.add_argument("--max-images", type=int, default=300)
    parser.add_argument("--input-size", type=int, default=128, help="ZUTIS's input size (default 128)")
    parser.add_argument("--zero-shot-per-concept", type=int, default=8)
    parser.add_argument("--out", type=Path, help="write the JSON here")
    args = parser.parse_args(argv)
    for path in (args.clip, args.checkpoint, args.scenes / "instances.json"):
        if path is not None and not path.is_file():
            parser.error(f"file not found: {path}")

    import torch

    torch.set_flush_denormal(True)
    result: dict[str, Any] = {"scenes": str(args.scenes), "input_size": args.input_size}
    if args.clip:
        from model.clip_weights import load_clip
        from model.training.shapes.clip_data import CachedTokenizer
        from model.training.shapes.world import ShapesWorld
        from model.training.shapes.zero_shot import render_eval_set, text_separation, zero_shot_accuracy

        towers = load_clip(args.clip)
        visual, config = towers.visual, towers.config
        world, tokenizer = ShapesWorld(), CachedTokenizer(config)
        own = config.open_clip_config()["vision_cfg"]["image_size"]
        own = int(own if isinstance(own, int) else own[0])
        for size in sorted({own, args.input_size}):
            images, labels = render_eval_set(world, size, args.zero_shot_per_concept, seed=123, stream=7)
            acc = zero_shot_accuracy(towers, tokenizer, images, labels, world, interpolate_positions=True)
            result[f"zero_shot_at_{size}px"] = acc
            print(f"zero-shot at {size} px: {acc['acc']:.3f} (colour {acc['acc_colour']:.3f}, shape "
                  f"{acc['acc_shape']:.3f}; {len(labels)} single-object images)")
        result["text"] = text_separation(towers, tokenizer, world)
        print(f"text: highest cosine between two concepts {result['text']['text_max_cosine']:.3f} "
              f"{result['text']['text_max_cosine_pair']}, pairs above 0.9: {result['text']['text_pairs_above_0.9']}")
    else:
        from model.checkpoint import load_checkpoint

        loaded = load_checkpoint(args.checkpoint)
        visual, config = loaded.model.encoder, loaded.metadata.model_config
    probes = token_probes(visual, args.scenes, args.max_images, args.input_size, config.image_mean, config.image_std)
    result["probes"] = probes
    print(f"token probes at {args.input_size} px (chance 0.125): per token colour {probes['token_colour']:.3f}, "
          f"shape {probes['token_shape']:.3f} ({probes['token_test_samples']} test tokens); per object colour "
          f"{probes['object_colour']:.3f}, shape {probes['object_shape']:.3f} ({probes['object_test_samples']} "
          "test objects)")
    write_json_report(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
