"""benchmarks/gpu_bench.py runs end to end on the CPU in its dry-run mode (tiny model), so that the GPU run is
known not to crash on plumbing; its figures there mean nothing."""

import json

import pytest

from benchmarks.gpu_bench import main, percentiles


def test_percentiles_in_milliseconds():
    assert percentiles([0.001] * 99 + [1.0]) == {"p50_ms": 1.0, "p99_ms": pytest.approx(10.99, abs=0.01)}


def test_gpu_bench_dry_run_in_process(tmp_path):
    out = tmp_path / "gpu.json"
    assert main(["--dry-run", "--device", "cpu", "--service-batch-sizes", "", "--json-out", str(out),
                 "--work-dir", str(tmp_path)]) == 0
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and result["service"] == []
    rows = result["in_process"]
    assert {(r["geometry"], r["batch_size"]) for r in rows} == {(g, b) for g in ("letterbox", "native")
                                                                for b in (1, 2)}
    for row in rows:
        for part in ("forward", "end_to_end"):
            assert row[part]["images_per_s"] > 0 and row[part]["p99_ms"] >= row[part]["p50_ms"] > 0
        assert 0.0 <= row["padded_fraction"] < 1.0
    letterbox = [r for r in rows if r["geometry"] == "letterbox"]
    assert all(r["padded_fraction"] > 0 for r in letterbox)  # COCO shapes leave part of every square empty


@pytest.mark.slow
def test_gpu_bench_dry_run_through_the_service(tmp_path):
    out = tmp_path / "gpu.json"
    assert main(["--dry-run", "--device", "cpu", "--geometries", "native", "--batch-sizes", "1",
                 "--port", "8797", "--json-out", str(out), "--work-dir", str(tmp_path)]) == 0
    [row] = json.loads(out.read_text())["service"]
    assert row["geometry"] == "native" and row["requests"] == 4 and row["images_per_s"] > 0
    assert row["p99_ms"] >= row["p50_ms"] > 0
