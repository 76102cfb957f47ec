"""How faithfully polygon answers reproduce their masks: the IoU of each instance's polygons (rasterised by
pycocotools) with its own RLE mask, on the example images and on shapes-world evaluation scenes.

The answers are the shipped demo checkpoint's, at its default thresholds, for the whole shapes vocabulary (all 64
concepts). Scenes come from the project's generator (``model.training.shapes.dataset.write_eval_scenes``, into a
temporary folder) with their own seed; nothing is tuned on them, they are only measured. The issue's bar: IoU >=
0.9 for every instance of at least 100 pixels, and a median >= 0.95.

    .venv/bin/python benchmarks/polygon_fidelity.py --checkpoint weights/zutis-shapes.safetensors --scenes 200 \\
        --tolerances 0 0.5 1 2 --out docs/polygon-fidelity.json

A script, not a test (tests/benchmarks/test_polygon_fidelity.py checks the bar on a few scenes).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MIN_AREA = 100
SCENE_SEED = 19  # this benchmark's own scenes (the issue number), not the training run's held-out ones


def iter_images(examples: Sequence[Path], n_scenes: int, seed: int) -> Iterator[tuple[str, str, Any]]:
    """``(source, name, PIL image)``: the example images, then ``n_scenes`` generated evaluation scenes."""
    from PIL import Image

    for path in examples:
        with Image.open(path) as image:
            yield "examples", path.name, image.convert("RGB")
    if n_scenes <= 0:
        return
    from model.training.shapes.dataset import write_eval_scenes

    with tempfile.TemporaryDirectory() as folder:
        write_eval_scenes(folder, n_scenes, seed, progress=False)
        for path in sorted((Path(folder) / "images").glob("*.png")):
            with Image.open(path) as image:
                yield "scenes", path.name, image.convert("RGB")


def instance_ious(prediction: Any, tolerance: float) -> list[tuple[int, float, int]]:
    """``(area, IoU, vertices)`` per instance of a prediction: its polygons at ``tolerance``, rasterised by
    pycocotools, against its RLE mask (both from ``model.answer``, as the service encodes them)."""
    from pycocotools import mask as mask_utils

    from model.answer import AnswerFormat, encode_answer
    from model.mask_iou import mask_iou
    from model.polygon import polygons_to_mask

    rle = encode_answer(prediction, "m", AnswerFormat(semantic="none")).instances
    poly = encode_answer(prediction, "m", AnswerFormat(semantic="none", mask_format="polygon",
                                                       polygon_tolerance=tolerance)).instances
    out = []
    for r, p in zip(rle, poly):
        mask = mask_utils.decode(r.segmentation.model_dump()).astype(bool)
        rings = p.segmentation
        out.append((int(mask.sum()), mask_iou(mask, polygons_to_mask(rings, prediction.image_hw)),
                    sum(len(ring) // 2 for ring in rings)))
    return out


def summarise(rows: list[tuple[int, float, int]]) -> dict[str, Any]:
    """The distribution of IoUs over all instances and over those of at least ``MIN_AREA`` pixels."""
    def stats(values: list[float]) -> dict[str, Any]:
        if not values:
            return {"n": 0}
        v = np.asarray(values)
        return {"n": len(v), "min": round(float(v.min()), 4), "p1": round(float(np.percentile(v, 1)), 4),
                "p5": round(float(np.percentile(v, 5)), 4), "p25": round(float(np.percentile(v, 25)), 4),
                "median": round(float(np.median(v)), 4), "mean": round(float(v.mean()), 4),
                "below_0.9": int((v < 0.9).sum()), "below_0.95": int((v < 0.95).sum())}

    large = [iou for area, iou, _ in rows if area >= MIN_AREA]
    vertices = [n for _, _, n in rows]
    return {"all": stats([iou for _, iou, _ in rows]), f"area>={MIN_AREA}": stats(large),
            "mean_vertices": round(float(np.mean(vertices)), 1) if vertices else 0.0,
            "passes": bool(large) and min(large) >= 0.9 and float(np.median(large)) >= 0.95}


def measure(checkpoint: Path, examples: Sequence[Path], n_scenes: int, seed: int,
            tolerances: Sequence[float]) -> dict[str, Any]:
    """The report: per tolerance, per source (examples, scenes) and together."""
    import torch

    from model.predictor import Predictor

    torch.set_flush_denormal(True)
    predictor = Predictor.from_checkpoint(checkpoint, "cpu")
    concepts = [c for c in predictor.metadata.vocabulary if c != "background"]
    rows: dict[float, dict[str, list]] = {t: {"examples": [], "scenes": []} for t in tolerances}
    for source, _, image in iter_images(examples, n_scenes, seed):
        prediction = predictor.predict([image], concepts, semantic=False)[0]
        for tolerance in tolerances:
            rows[tolerance][source].extend(instance_ious(prediction, tolerance))
    report: dict[str, Any] = {"checkpoint": str(checkpoint), "model": predictor.model_id, "scenes": n_scenes,
                              "scene_seed": seed, "examples": [p.name for p in examples], "min_area": MIN_AREA,
                              "by_tolerance": {}}
    for tolerance in tolerances:
        by_source = rows[tolerance]
        report["by_tolerance"][str(tolerance)] = {
            "examples": summarise(by_source["examples"]), "scenes": summarise(by_source["scenes"]),
            "together": summarise(by_source["examples"] + by_source["scenes"])}
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "weights" / "zutis-shapes.safetensors")
    parser.add_argument("--examples", type=Path, nargs="*", default=sorted((ROOT / "examples").glob("*.png")))
    parser.add_argument("--scenes", type=int, default=200, help="generated evaluation scenes")
    parser.add_argument("--seed", type=int, default=SCENE_SEED)
    parser.add_argument("--tolerances", type=float, nargs="+", default=[1.0], help="polygon tolerances, pixels")
    parser.add_argument("--out", type=Path, help="write the report here as JSON")
    args = parser.parse_args(argv)
    from benchmarks.reports import write_json_report

    report = measure(args.checkpoint, args.examples, args.scenes, args.seed, args.tolerances)
    print("| tolerance | source | instances | >= 100 px | min IoU | p5 | median | mean | below 0.9 | vertices |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for tolerance, sources in report["by_tolerance"].items():
        for source, summary in sources.items():
            large = summary[f"area>={MIN_AREA}"]
            if not large.get("n"):
                continue
            print(f"| {tolerance} | {source} | {summary['all']['n']} | {large['n']} | {large['min']} | {large['p5']} "
                  f"| {large['median']} | {large['mean']} | {large['below_0.9']} | {summary['mean_vertices']} |")
    write_json_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
