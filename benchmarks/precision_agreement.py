"""How much the answers of reduced precision and of the OpenVINO runtime differ from torch float32 (the official
code's answers), on a checkpoint and a few images; prints a table and writes JSON.

For each variant (torch bfloat16, OpenVINO float32, OpenVINO bfloat16) against torch float32, per image: the
instances (concept, score order) found by both, instances only one of them found, the lowest mask IoU between
matched instances (matched in score order by concept, then greedy best IoU), the largest score difference, and
the fraction of semantic-map pixels that agree.

    .venv/bin/python benchmarks/precision_agreement.py --checkpoint weights/zutis-shapes.safetensors \\
        --images examples/ --concepts "red circle,blue star,green heart" --json-out runs/bench/precision.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.reports import write_json_report  # noqa: E402

VARIANTS = (("torch", "bfloat16"), ("openvino", "float32"), ("openvino", "bfloat16"))


def compare(reference: Any, other: Any) -> dict[str, Any]:
    """Agreement of two ``Prediction``s of one image (``reference`` the float32 torch answer)."""
    from model.mask_iou import mask_iou

    def decoded(prediction: Any) -> list[tuple[str, float, Any]]:
        return [(i.concept, i.score, i.mask) for i in prediction.instances]  # bool (H, W): the predictor's own

    ref, oth = decoded(reference), decoded(other)
    used: set[int] = set()
    ious, score_diffs = [], []
    for concept, score, mask in ref:
        best, best_iou = None, -1.0
        for j, (c, _, m) in enumerate(oth):
            if j in used or c != concept:
                continue
            iou = mask_iou(mask, m)
            if iou > best_iou:
                best, best_iou = j, iou
        if best is not None and best_iou > 0.5:
            used.add(best)
            ious.append(best_iou)
            score_diffs.append(abs(score - oth[best][1]))
    same_order = [c for c, _, _ in ref] == [c for c, _, _ in oth]
    semantic = float((reference.semantic == other.semantic).mean())
    return {"instances": [len(ref), len(oth)], "matched": len(ious), "same_concepts_and_order": same_order,
            "min_mask_iou": round(min(ious), 4) if ious else None,
            "max_score_diff": round(max(score_diffs), 5) if score_diffs else None,
            "semantic_agreement": round(semantic, 5)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True, help="an image file or a folder of them")
    parser.add_argument("--concepts", action="append", required=True, help="comma-separated; repeatable (one "
                        "vocabulary per flag: each image is answered with each)")
    parser.add_argument("--cache-dir", type=Path, help="OpenVINO export cache (default: model.runtime's)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)

    from PIL import Image

    from model.predictor import Predictor

    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")) \
        if args.images.is_dir() else [args.images]
    images = [Image.open(p).convert("RGB") for p in paths]
    vocabularies = [[c.strip() for c in v.split(",") if c.strip()] for v in args.concepts]
    reference = Predictor.from_checkpoint(args.checkpoint, "cpu", "float32", runtime="torch")
    report: dict[str, Any] = {"checkpoint": str(args.checkpoint), "images": [p.name for p in paths], "variants": {}}
    answers = {tuple(v): reference.predict(images, v) for v in vocabularies}
    for runtime, dtype in VARIANTS:
        predictor = Predictor.from_checkpoint(args.checkpoint, "cpu", dtype, runtime=runtime,
                                              cache_dir=args.cache_dir)
        rows = []
        for vocabulary, expected in answers.items():
            for path, ref, got in zip(paths, expected, predictor.predict(images, list(vocabulary))):
                row = {"image": path.name, "concepts": len(vocabulary), **compare(ref, got)}
                rows.append(row)
                print(f"{runtime}-{dtype} {path.name} {len(vocabulary)} concepts: {row}", flush=True)
        report["variants"][f"{runtime}-{dtype}"] = rows
    write_json_report(args.json_out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
