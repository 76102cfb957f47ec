"""The polygon answers' fidelity bar (issue 19) on the examples and a few generated shapes scenes, with the demo
checkpoint: rasterised by pycocotools, every instance of >= 100 px has IoU >= 0.9 with its RLE mask, median >= 0.95
(the full distribution over 200 scenes: benchmarks/polygon_fidelity.py, README)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.polygon_fidelity import MIN_AREA, SCENE_SEED, measure, summarise

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = REPO / "weights" / "zutis-shapes.safetensors"


def test_summary_counts_and_the_bar():
    rows = [(50, 0.2, 4), (150, 0.93, 8), (400, 0.99, 12), (100, 0.96, 6)]
    summary = summarise(rows)
    large = summary[f"area>={MIN_AREA}"]
    assert summary["all"]["n"] == 4 and large["n"] == 3 and large["min"] == 0.93 and large["median"] == 0.96
    assert summary["passes"] is True and summary["mean_vertices"] == 7.5
    assert summarise([(150, 0.89, 4), (400, 0.99, 8)])["passes"] is False  # one below 0.9
    assert summarise([(150, 0.91, 4), (400, 0.92, 8)])["passes"] is False  # median below 0.95


@pytest.mark.slow
@pytest.mark.skipif(not CHECKPOINT.is_file(), reason="the demo checkpoint is not in this checkout")
def test_polygons_reproduce_their_masks_on_examples_and_scenes():
    report = measure(CHECKPOINT, sorted((REPO / "examples").glob("*.png")), 6, SCENE_SEED, [1.0])
    for source in ("examples", "scenes"):
        summary = report["by_tolerance"]["1.0"][source]
        large = summary[f"area>={MIN_AREA}"]
        assert large["n"] >= 5, (source, summary)
        assert large["min"] >= 0.9 and large["median"] >= 0.95, (source, summary)
        assert summary["passes"]
