"""Evaluate a checkpoint on a scene folder as ``model.train``'s export does, with class-agnostic AP too.

One prediction pass (``model.training.evaluation.runner.evaluate_checkpoint`` with the release's 0.001 score
floor, so the exported service threshold does not cut the ranking), scored category-aware (AP, AP50, AP75, mIoU)
and class-agnostic (the same predictions, every category mapped to one). For the ladder's rows
(experiments/shapes/ladder-r0.md).

    MALLOC_MMAP_THRESHOLD_=33554432 .venv/bin/python experiments/shapes/ladder_eval.py \\
        --checkpoint runs/ladder/r0_grad/model.safetensors --scenes runs/ladder/cache/shapes_test_colour-*/

A script, not a test. Prints one JSON object; ``--out`` writes it too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def evaluate(checkpoint: Path, scenes: Path, max_images: int | None) -> dict[str, Any]:
    from model.training.evaluation.coco_ap import evaluate_instances
    from model.training.evaluation.datasets import load_coco_dataset
    from model.training.evaluation.runner import evaluate_checkpoint

    dataset = load_coco_dataset(scenes / "instances.json", scenes / "images", scenes / "labels")
    start = time.monotonic()
    run = evaluate_checkpoint(checkpoint, dataset, max_images=max_images, score_threshold=0.001)
    ids = [s.image_id for s in dataset.samples[:max_images]]
    agnostic = evaluate_instances(dataset.coco, run.results, class_agnostic=True, image_ids=ids)
    inst, sem = run.report["instances"], run.report["semantic"]
    keys = ("AP", "AP50", "AP75")
    return {"checkpoint": str(checkpoint), "scenes": str(scenes), "images": len(ids),
            "category": {k: inst[k] for k in keys}, "class_agnostic": {k: agnostic[k] for k in keys},
            "mIoU": sem["mIoU"], "results": len(run.results), "seconds": round(time.monotonic() - start, 1)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--scenes", type=Path, required=True, help="scene folder: images/, labels/, instances.json")
    parser.add_argument("--max-images", type=int)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    report = evaluate(args.checkpoint, args.scenes, args.max_images)
    text = json.dumps(report)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
